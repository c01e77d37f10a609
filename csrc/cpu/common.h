// Shared, ATen-free definitions of the CPU kernels: dtypes, exact scalar
// conversions, the plain-pointer job descriptions that the ATen layer
// (steer.cpp, sparse_linear.cpp) fills in, and the table of kernels that each
// instruction set (isa_*.cpp) provides.
//
// This header is included by the per-ISA translation units *before* their
// `#pragma GCC target`, so every inline function here is compiled for the
// baseline ISA only and the linker can never pick an AVX-512 copy of it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace steerkern {
namespace cpu {

enum class DType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t b) { return bits_to_f32(uint32_t(b) << 16); }

// Round to nearest even, NaN -> 0x7FC0: the same bits as c10::BFloat16.
inline uint16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u = f32_to_bits(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_f32(sign | 0x7F800000u | (man << 13));  // inf, NaN
  if (exp == 0) {  // zero or subnormal: man * 2^-24 is exact in fp32
    float f = float(man) * 5.9604644775390625e-8f;
    return bits_to_f32(sign | f32_to_bits(f));
  }
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// IEEE round to nearest even, as F16C's vcvtps2ph and c10::Half do.
inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;   // NaN
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // rounds past 65504: inf
  if (a < 0x38800000u) {                         // below 2^-14: subnormal half
    // v * 2^24 < 1024 is exact; rint rounds half to even in the default mode
    return sign | uint16_t(std::nearbyint(bits_to_f32(a) * 16777216.0f));
  }
  a -= 112u << 23;  // rebias the exponent from 127 to 15
  a += 0xFFFu + ((a >> 13) & 1u);
  return sign | uint16_t(a >> 13);
}

inline int64_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

// One steering table (see steerkern/ops/reference.py), fp32, K entries.
// A null pointer means the component is absent.
struct SteerTableView {
  int64_t K = 0;  // entries
  int64_t k = 0;  // basis rows per entry
  int64_t d = 0;  // hidden size
  const float* basis = nullptr;     // [K, k, d]
  const float* target = nullptr;    // [K, k]
  const float* gain = nullptr;      // [K]
  const float* vec = nullptr;       // [K, d]
  const float* alpha = nullptr;     // [K]
  const float* scale = nullptr;     // [K, d]
  const float* shift = nullptr;     // [K, d]
  const float* cond_dir = nullptr;  // [K, d]
  const float* cond_thr = nullptr;  // [K]
  const uint8_t* preserve_norm = nullptr;  // [K]
};

// steer / add_steer_rmsnorm over rows [r0, r1) of a [rows, d] problem.
struct SteerJob {
  SteerTableView table;
  const int32_t* index = nullptr;  // [rows] in [0, K]; null: entry 1 for all rows
  DType dt = DType::F32;           // dtype of h / x / residual / out / r / y
  const void* h = nullptr;         // steer: h; add_steer_rmsnorm: x
  const void* residual = nullptr;  // add_steer_rmsnorm only, may be null
  void* out = nullptr;             // steer: out; add_steer_rmsnorm: r
  // add_steer_rmsnorm only
  const void* weight = nullptr;
  DType wdt = DType::F32;
  float eps = 0.f;
  float weight_offset = 0.f;
  void* y = nullptr;
};

// Sparse product of B (1..8) rows over a shared list of active input rows:
//   y[b, c] = bias[c] + sum_j coef[b, j] * Wt[idx[j], c]
// coef[b, j] is 0 where row b does not keep input idx[j].
struct SparseJob {
  int64_t B = 1;
  int64_t nact = 0;
  const int32_t* idx = nullptr;  // [nact], ascending
  const float* coef = nullptr;   // [B, coef_ld]
  int64_t coef_ld = 0;           // row stride of coef: nact, or the whole job's nact for a part of it
  const void* wt = nullptr;      // [in, out]
  DType wdt = DType::F32;
  int64_t out = 0;
  const float* bias = nullptr;  // [out] fp32 or null
  void* y = nullptr;            // [B, out], row stride out
  DType ydt = DType::F32;
  bool coef_bf16 = false;  // every coef is exactly a bf16 value (bf16 activations)
};

// Attention of one query token per (batch row, head) over L cached keys, no
// mask (a decode step: every cached position is visible).  Strides are in
// elements; a head's D values are contiguous.  out is [B, H, D] contiguous.
struct AttnJob {
  int64_t B = 0, H = 0, KVH = 0, L = 0, D = 0;
  const void* q = nullptr;  // [B, H, D] with strides q_sb, q_sh
  int64_t q_sb = 0, q_sh = 0;
  const void* k = nullptr;  // [B, KVH, L, D] with strides k_sb, k_sh, k_sl
  int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  const void* v = nullptr;  // as k
  int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  void* out = nullptr;
  DType dt = DType::F32;  // of q, k, v and out
  float scale = 1.0f;
};

// The kernels one instruction set provides.  All take plain pointers.
struct Kernels {
  const char* name;
  void (*steer_rows)(const SteerJob& job, int64_t r0, int64_t r1);
  void (*add_steer_rmsnorm_rows)(const SteerJob& job, int64_t r0, int64_t r1);
  // xf[i] = float(x[i]); score[i] = |xf[i]| * (scale ? scale[i] : 1)
  void (*scores)(const void* x, DType xdt, const float* scale, int64_t n, float* xf, float* score);
  // columns [c0, c1) of every output row
  void (*sparse_cols)(const SparseJob& job, int64_t c0, int64_t c1);
  // (batch row, head) pairs [r0, r1) of a decode attention, r = b * H + h
  void (*attend)(const AttnJob& job, int64_t r0, int64_t r1);
};

extern const Kernels kPortableKernels;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define STEERKERN_X86 1
extern const Kernels kAvx2Kernels;
extern const Kernels kAvx512Kernels;
extern const Kernels kAvx512Bf16Kernels;
// the GEMV of the AVX512-BF16 build (isa_avx512bf16.cpp)
void sparse_cols_avx512bf16(const SparseJob& job, int64_t c0, int64_t c1);
#endif

// The kernels for the best instruction set this CPU supports (or the cap set
// by STEERKERN_CPU_ISA / set_capability).
const Kernels& kernels();
const char* capability();
// Lower (or restore) the instruction set used: "portable", "avx2+fma",
// "avx512", or "auto" for the best one.  Returns the one now in use, or null
// for an unknown name.
const char* set_capability(const char* name);

// A per-thread fp32 scratch buffer of at least n floats (grows, never shrinks).
// Slots 0-2 and 5 belong to the kernels, 3-4 to the ATen layer.
constexpr int kScratchSlots = 6;
float* scratch(int64_t n, int slot);

}  // namespace cpu
}  // namespace steerkern
