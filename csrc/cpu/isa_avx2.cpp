// The kernels of isa_impl.h compiled for AVX2 with FMA and F16C, chosen at run
// time only when the CPU has them (see dispatch.cpp).
#include "common.h"

#ifdef STEERKERN_X86
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define SK_ISA 1
namespace steerkern {
namespace cpu {
namespace avx2 {
#include "isa_impl.h"
}  // namespace avx2
}  // namespace cpu
}  // namespace steerkern
#undef SK_ISA
#pragma GCC pop_options

namespace steerkern {
namespace cpu {
const Kernels kAvx2Kernels = avx2::make_kernels("avx2+fma");
}  // namespace cpu
}  // namespace steerkern
#endif
