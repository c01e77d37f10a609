// The kernels of isa_impl.h in plain C++ (one lane): the fallback on CPUs
// without AVX2 and on other architectures.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#define SK_ISA 0
namespace steerkern {
namespace cpu {
namespace portable {
#include "isa_impl.h"
}  // namespace portable

const Kernels kPortableKernels = portable::make_kernels("portable");
}  // namespace cpu
}  // namespace steerkern
#undef SK_ISA
