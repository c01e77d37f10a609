// The kernels of isa_impl.h compiled for AVX-512 (F, BW, VL, DQ) with FMA and
// F16C, chosen at run time only when the CPU has them (see dispatch.cpp).
#include "common.h"

#ifdef STEERKERN_X86
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined
// placeholders (GCC bug 105593, fixed in 13)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SK_ISA 2
namespace steerkern {
namespace cpu {
namespace avx512 {
#include "isa_impl.h"
}  // namespace avx512
}  // namespace cpu
}  // namespace steerkern
#undef SK_ISA
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace steerkern {
namespace cpu {
const Kernels kAvx512Kernels = avx512::make_kernels("avx512");
// CPUs with AVX512-BF16: these kernels but for the GEMV, which comes from the
// BF16 build (isa_avx512bf16.cpp); GCC's code for the other kernels in that
// build measured 20-30% slower (steer_)
const Kernels kAvx512Bf16Kernels = [] {
  Kernels k = avx512::make_kernels("avx512bf16");
  k.sparse_cols = sparse_cols_avx512bf16;
  return k;
}();
}  // namespace cpu
}  // namespace steerkern
#endif
