// The kernels of isa_impl.h compiled for AVX-512 (F, BW, VL, DQ) and
// AVX512-BF16, with FMA and F16C, chosen at run time only when the CPU has
// them (see dispatch.cpp).  Only the bf16 GEMV pass differs from isa_avx512.
#include "common.h"

#ifdef STEERKERN_X86
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined
// placeholders (GCC bug 105593, fixed in 13)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SK_ISA 3
namespace steerkern {
namespace cpu {
namespace avx512bf16 {
#include "isa_impl.h"
}  // namespace avx512bf16
}  // namespace cpu
}  // namespace steerkern
#undef SK_ISA
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace steerkern {
namespace cpu {
const Kernels kAvx512Bf16Kernels = avx512bf16::make_kernels("avx512bf16");
}  // namespace cpu
}  // namespace steerkern
#endif
