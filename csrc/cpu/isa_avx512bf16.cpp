// isa_impl.h compiled for AVX-512 (F, BW, VL, DQ) and AVX512-BF16, with FMA
// and F16C.  Only its GEMV (sparse_cols, with the vdpbf16ps pass) is used:
// isa_avx512.cpp builds the avx512bf16 table from it and the AVX-512 build's
// other kernels; the compiler drops the rest of this build.
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
void sparse_cols_avx512bf16(const SparseJob& job, int64_t c0, int64_t c1) { avx512bf16::sparse_cols(job, c0, c1); }
}  // namespace cpu
}  // namespace steerkern
#endif
