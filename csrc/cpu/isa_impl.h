// The CPU kernels, written once over a small vector vocabulary and compiled
// once per instruction set.  Each isa_*.cpp includes this file inside its own
// namespace after `#pragma GCC target(...)`, with SK_ISA set to
//   3: AVX-512 with BF16 dot products, 2: AVX-512 (16 fp32 lanes),
//   1: AVX2 + FMA + F16C (8 lanes), 0: portable (1 lane).
// No #include here: everything this file uses is included by the TU before
// the pragma, so no shared inline function is ever compiled for a wider ISA.
//
// Kernels and their memory traffic (E = element size of the row dtype):
// * steer_rows: h [rows, d] -> out [rows, d].  Each row is read once into an
//   fp32 row buffer (L1/L2 resident), steered there, written once:
//   rows * d * 2E bytes.  Rows with index 0, or whose condition fails, are
//   copied bit-exact.  out may be h itself (steer_): a row is fully read
//   before any of it is written.  With a residual (add_steer), the row is
//   T(h + residual), written to out in the reading pass, then steered there.
// * add_steer_rmsnorm_rows: x, residual -> r, y: rows * d * 4E bytes.  In
//   place (add_steer_rmsnorm_), r is residual and y is x: each element of
//   residual is read before r overwrites it, and x is read whole before y.
// * sparse_cols: y[b, c] = bias[c] + sum_j coef[b, j] * Wt[idx[j], c] for a
//   slice of columns.  Only the listed (active) rows of Wt are read: nact *
//   cols * sizeof(w) bytes; the fp32 accumulators of a column tile stay in
//   L1 (L2 for B > 2) and 8 active rows are streamed per pass to cut
//   accumulator traffic.  bf16 weights are widened by a 16-bit shift, fp16
//   by F16C; with AVX512-BF16 and bf16 activations, pairs of active rows go
//   through vdpbf16ps instead (half the instructions per weight byte).

namespace {

constexpr float kTiny = 1e-30f;


// ---------------------------------------------------------------- vectors
#if SK_ISA >= 2
using vf = __m512;
constexpr int64_t W = 16;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float a) { return _mm512_set1_ps(a); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vabs(vf a) { return _mm512_abs_ps(a); }
inline float vsum(vf a) {
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vload_f32(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore_f32(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vload_bf16(const uint16_t* p) {
  __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline vf vload_f16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void vstore_bf16(uint16_t* p, vf v) {
  // round to nearest even in integer arithmetic (bit-exact with c10::BFloat16);
  // vcvtneps2bf16 would flush subnormals
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline void vstore_f16(uint16_t* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline vf vround_bf16(vf v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                               _mm512_set1_epi32(int(0xFFFF0000u)));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_castsi512_ps(r), v);
}
inline vf vround_f16(vf v) { return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
#elif SK_ISA == 1
using vf = __m256;
constexpr int64_t W = 8;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset(float a) { return _mm256_set1_ps(a); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vload_f32(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore_f32(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vload_bf16(const uint16_t* p) {
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline vf vload_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void vstore_bf16(uint16_t* p, vf v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // pack 8 x u32 (all < 2^16) to 8 x u16; packus works per 128-bit lane
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void vstore_f16(uint16_t* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline vf vround_bf16(vf v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
                               _mm256_set1_epi32(int(0xFFFF0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
inline vf vround_f16(vf v) { return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }
#else
using vf = float;
constexpr int64_t W = 1;
inline vf vzero() { return 0.0f; }
inline vf vset(float a) { return a; }
inline vf vadd(vf a, vf b) { return a + b; }
inline vf vmul(vf a, vf b) { return a * b; }
inline vf vfma(vf a, vf b, vf c) { return std::fma(a, b, c); }
inline vf vabs(vf a) { return std::fabs(a); }
inline float vsum(vf a) { return a; }
inline vf vload_f32(const float* p) { return *p; }
inline void vstore_f32(float* p, vf v) { *p = v; }
inline vf vload_bf16(const uint16_t* p) { return bf16_to_f32(*p); }
inline vf vload_f16(const uint16_t* p) { return f16_to_f32(*p); }
inline void vstore_bf16(uint16_t* p, vf v) { *p = f32_to_bf16(v); }
inline void vstore_f16(uint16_t* p, vf v) { *p = f32_to_f16(v); }
inline vf vround_bf16(vf v) { return bf16_to_f32(f32_to_bf16(v)); }
inline vf vround_f16(vf v) { return f16_to_f32(f32_to_f16(v)); }
#endif

// Two interchangeable operation sets, W lanes and 1 lane, so that a loop body
// is written once and serves both the vector part and the tail.
struct VOps {
  using T = vf;
  static T set(float a) { return vset(a); }
  static T load(const float* p) { return vload_f32(p); }
  static void store(float* p, T v) { vstore_f32(p, v); }
  static T add(T a, T b) { return vadd(a, b); }
  static T mul(T a, T b) { return vmul(a, b); }
  static T fma(T a, T b, T c) { return vfma(a, b, c); }
  static T abs(T a) { return vabs(a); }
  template <DType D> static T ld(const void* p, int64_t i) {
    if constexpr (D == DType::F32) return vload_f32(static_cast<const float*>(p) + i);
    else if constexpr (D == DType::BF16) return vload_bf16(static_cast<const uint16_t*>(p) + i);
    else return vload_f16(static_cast<const uint16_t*>(p) + i);
  }
  template <DType D> static void st(void* p, int64_t i, T v) {
    if constexpr (D == DType::F32) vstore_f32(static_cast<float*>(p) + i, v);
    else if constexpr (D == DType::BF16) vstore_bf16(static_cast<uint16_t*>(p) + i, v);
    else vstore_f16(static_cast<uint16_t*>(p) + i, v);
  }
  // v rounded to D and back, in registers: what st<D> then ld<D> would give
  template <DType D> static T rnd(T v) {
    if constexpr (D == DType::F32) return v;
    else if constexpr (D == DType::BF16) return vround_bf16(v);
    else return vround_f16(v);
  }
};

struct SOps {
  using T = float;
  static T set(float a) { return a; }
  static T load(const float* p) { return *p; }
  static void store(float* p, T v) { *p = v; }
  static T add(T a, T b) { return a + b; }
  static T mul(T a, T b) { return a * b; }
  static T fma(T a, T b, T c) { return std::fma(a, b, c); }
  static T abs(T a) { return std::fabs(a); }
  template <DType D> static T ld(const void* p, int64_t i) {
    if constexpr (D == DType::F32) return static_cast<const float*>(p)[i];
    else if constexpr (D == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    else return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
  template <DType D> static void st(void* p, int64_t i, T v) {
    if constexpr (D == DType::F32) static_cast<float*>(p)[i] = v;
    else if constexpr (D == DType::BF16) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
    else static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  }
  template <DType D> static T rnd(T v) {
    if constexpr (D == DType::F32) return v;
    else if constexpr (D == DType::BF16) return bf16_to_f32(f32_to_bf16(v));
    else return f16_to_f32(f32_to_f16(v));
  }
};

#if SK_ISA > 0
// 2W bf16 values as two fp32 vectors, the even- and the odd-indexed ones:
// a bf16 is the top half of an fp32, so one shift and one mask convert 2W
// values (the accumulators keep this split order until the final store).
#if SK_ISA >= 2
inline void vload_bf16_split(const uint16_t* p, vf& even, vf& odd) {
  __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
}
#else
inline void vload_bf16_split(const uint16_t* p, vf& even, vf& odd) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))));
}
#endif
#endif

// f(ops, i) over [0, n): W lanes at a time, then one at a time.
template <class F>
inline void each(int64_t n, F&& f) {
  int64_t i = 0;
  // two vectors per trip: the loop-invariant tests in f are paid half as often
  for (; i + 2 * W <= n; i += 2 * W) {
    f(VOps{}, i);
    f(VOps{}, i + W);
  }
  for (; i + W <= n; i += W) f(VOps{}, i);
  for (; i < n; ++i) f(SOps{}, i);
}

// A running fp32 sum fed by both halves of each().
struct Sum {
  vf v;
  float s;
  Sum() : v(vzero()), s(0.0f) {}
  float total() const { return vsum(v) + s; }
};
#if SK_ISA > 0
inline void sum_fma(Sum& acc, vf a, vf b) { acc.v = vfma(a, b, acc.v); }
#endif
inline void sum_fma(Sum& acc, float a, float b) { acc.s = std::fma(a, b, acc.s); }

float dot(const float* a, const float* b, int64_t n) {
  vf s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    s0 = vfma(vload_f32(a + i), vload_f32(b + i), s0);
    s1 = vfma(vload_f32(a + i + W), vload_f32(b + i + W), s1);
    s2 = vfma(vload_f32(a + i + 2 * W), vload_f32(b + i + 2 * W), s2);
    s3 = vfma(vload_f32(a + i + 3 * W), vload_f32(b + i + 3 * W), s3);
  }
  for (; i + W <= n; i += W) s0 = vfma(vload_f32(a + i), vload_f32(b + i), s0);
  float s = vsum(vadd(vadd(s0, s1), vadd(s2, s3)));
  for (; i < n; ++i) s = std::fma(a[i], b[i], s);
  return s;
}

// Prefetch the cache lines of [p + from, p + from + bytes): the next row is
// requested while this one is converted, so that its read overlaps with this
// row's compute and write phases (one row ahead is enough to keep DRAM busy).
inline void prefetch_lines(const void* p, int64_t from, int64_t bytes) {
#if SK_ISA > 0
  if (!p) return;
  const char* c = static_cast<const char*>(p) + from;
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
#else
  (void)p, (void)from, (void)bytes;
#endif
}

// What one read of a row yields beside the fp32 copy: sum of squares and
// the dot products with up to two fp32 directions (Q_e[0], the condition).
struct RowSums {
  float ss = 0.0f, d0 = 0.0f, d1 = 0.0f;
};

// The one pass over a row's input: buf = float(x), or with RES r = T(x + res)
// (the unfused residual add, rounded once) and buf = float(r); the sums of
// RowSums in the same pass (two accumulators each, to hide FMA latency); and
// the next rows are prefetched meanwhile.
template <DType T, bool RES, bool D0, bool D1, bool STORE>
RowSums read_row_t(const void* x, const void* res, void* r, float* buf, int64_t d, const float* p0,
                   const float* p1, const void* x_next, const void* res_next) {
  constexpr int64_t es = T == DType::F32 ? 4 : 2;
  vf ss[2] = {vzero(), vzero()}, a0[2] = {vzero(), vzero()}, a1[2] = {vzero(), vzero()};
  auto step = [&](int64_t i, int u) {
    vf v = VOps::ld<T>(x, i);
    if constexpr (RES) {
      v = vadd(v, VOps::ld<T>(res, i));
      if constexpr (STORE) VOps::st<T>(r, i, v);
      v = VOps::rnd<T>(v);
    }
    vstore_f32(buf + i, v);
    ss[u] = vfma(v, v, ss[u]);
    if constexpr (D0) a0[u] = vfma(v, vload_f32(p0 + i), a0[u]);
    if constexpr (D1) a1[u] = vfma(v, vload_f32(p1 + i), a1[u]);
  };
  int64_t i = 0;
  for (; i + 2 * W <= d; i += 2 * W) {
    prefetch_lines(x_next, i * es, 2 * W * es);
    if constexpr (RES) prefetch_lines(res_next, i * es, 2 * W * es);
    step(i, 0);
    step(i + W, 1);
  }
  prefetch_lines(x_next, i * es, (d - i) * es);
  if constexpr (RES) prefetch_lines(res_next, i * es, (d - i) * es);
  for (; i + W <= d; i += W) step(i, 0);
  RowSums out;
  out.ss = vsum(vadd(ss[0], ss[1]));
  out.d0 = vsum(vadd(a0[0], a0[1]));
  out.d1 = vsum(vadd(a1[0], a1[1]));
  for (; i < d; ++i) {
    float v = SOps::ld<T>(x, i);
    if constexpr (RES) {
      v = v + SOps::ld<T>(res, i);
      if constexpr (STORE) SOps::st<T>(r, i, v);
      v = SOps::rnd<T>(v);
    }
    buf[i] = v;
    out.ss = std::fma(v, v, out.ss);
    if constexpr (D0) out.d0 = std::fma(v, p0[i], out.d0);
    if constexpr (D1) out.d1 = std::fma(v, p1[i], out.d1);
  }
  return out;
}

template <DType T, bool RES, bool STORE>
RowSums read_row_s(const void* x, const void* res, void* r, float* buf, int64_t d, const float* p0, const float* p1,
                 const void* x_next, const void* res_next) {
  if (p0 && p1) return read_row_t<T, RES, true, true, STORE>(x, res, r, buf, d, p0, p1, x_next, res_next);
  if (p0) return read_row_t<T, RES, true, false, STORE>(x, res, r, buf, d, p0, p1, x_next, res_next);
  if (p1) return read_row_t<T, RES, false, true, STORE>(x, res, r, buf, d, p0, p1, x_next, res_next);
  return read_row_t<T, RES, false, false, STORE>(x, res, r, buf, d, p0, p1, x_next, res_next);
}

// With RES and r == nullptr the sum is not stored (a row about to be steered
// is written once, steered; store_buf writes it if its condition fails).
template <DType T, bool RES>
RowSums read_row(const void* x, const void* res, void* r, float* buf, int64_t d, const float* p0, const float* p1,
                 const void* x_next, const void* res_next) {
  if constexpr (RES) {
    if (!r) return read_row_s<T, RES, false>(x, res, r, buf, d, p0, p1, x_next, res_next);
  }
  return read_row_s<T, RES, RES>(x, res, r, buf, d, p0, p1, x_next, res_next);
}

// buf (values already rounded to T) written out as T: exact.
template <DType T>
void store_buf(const float* buf, void* out, int64_t d) {
  each(d, [&](auto o, int64_t i) {
    using O = decltype(o);
    O::template st<T>(out, i, O::load(buf + i));
  });
}

// The directions whose dot products read_row takes for entry e.
inline const float* first_direction(const SteerTableView& t, int64_t e) {
  return (t.basis && t.k > 0) ? t.basis + e * t.k * t.d : nullptr;
}
inline const float* condition_direction(const SteerTableView& t, int64_t e) {
  return t.cond_dir ? t.cond_dir + e * t.d : nullptr;
}

// Step 1 of the spec: does entry e's condition hold for this row?
// (cos = h.u / max(||h||, tiny), 0 for a zero or NaN norm.)
bool condition_holds(const SteerTableView& t, int64_t e, const RowSums& s) {
  if (!t.cond_dir) return true;
  const float norm = std::sqrt(s.ss);
  float cos = 0.0f;
  if (norm > 0.0f) cos = s.d1 / std::max(norm, kTiny);
  return cos > t.cond_thr[e];
}

// Steps 2-5 of the spec on the fp32 row `buf` (read_row gave its sums),
// written to `out` rounded once to T.  With `keep`, buf receives the rounded
// values and their sum of squares is returned (RMSNorm reads them).
template <DType T>
float apply_entry(const SteerTableView& t, int64_t e, float* buf, const RowSums& sums, void* out, bool keep) {
  const int64_t d = t.d, k = t.k;
  const float* Q = first_direction(t, e);
  float* coef = nullptr;
  if (Q) {  // coef_j = c_j - Q_j . h
    coef = scratch(k, 2);
    coef[0] = t.target[e * k] - sums.d0;
    for (int64_t j = 1; j < k; ++j) coef[j] = t.target[e * k + j] - dot(buf, Q + j * d, d);
  }
  const float gain = Q ? t.gain[e] : 0.0f;
  const float* v = t.vec ? t.vec + e * d : nullptr;
  const float alpha = v ? t.alpha[e] : 0.0f;
  const float* w = t.scale ? t.scale + e * d : nullptr;
  const float* b = t.shift ? t.shift + e * d : nullptr;
  const bool renorm = t.preserve_norm && t.preserve_norm[e];

  auto steered = [&](auto o, int64_t i) {
    using O = decltype(o);
    auto y = O::load(buf + i);
    if (Q) {
      auto p = O::mul(O::set(coef[0]), O::load(Q + i));
      for (int64_t j = 1; j < k; ++j) p = O::fma(O::set(coef[j]), O::load(Q + j * d + i), p);
      y = O::fma(O::set(gain), p, y);
    }
    if (v) y = O::fma(O::set(alpha), O::load(v + i), y);
    if (w) y = O::mul(y, O::load(w + i));
    if (b) y = O::add(y, O::load(b + i));
    return y;
  };
  // write y rounded to T; with keep, also buf = rounded y and sum its squares
  Sum kept;
  auto emit = [&](auto o, int64_t i, auto y) {
    using O = decltype(o);
    O::template st<T>(out, i, y);
    if (keep) {
      y = O::template rnd<T>(y);
      O::store(buf + i, y);
      sum_fma(kept, y, y);
    }
  };

  if (!renorm) {
    each(d, [&](auto o, int64_t i) { emit(o, i, steered(o, i)); });
    return kept.total();
  }
  Sum s2;
  each(d, [&](auto o, int64_t i) {
    auto y = steered(o, i);
    decltype(o)::store(buf + i, y);
    sum_fma(s2, y, y);
  });
  const float n_out = std::sqrt(s2.total());
  const float f = n_out > 0.0f ? std::sqrt(sums.ss) / std::max(n_out, kTiny) : 1.0f;
  if (n_out > 0.0f) {
    each(d, [&](auto o, int64_t i) {
      using O = decltype(o);
      emit(o, i, O::mul(O::load(buf + i), O::set(f)));
    });
  } else {
    each(d, [&](auto o, int64_t i) { emit(o, i, decltype(o)::load(buf + i)); });
  }
  return kept.total();
}

inline int64_t entry_of(const SteerJob& job, int64_t r) {
  return job.table.K == 0 ? 0 : job.index ? job.index[r] : 1;
}

template <DType T>
void steer_rows_t(const SteerJob& job, int64_t r0, int64_t r1) {
  const SteerTableView& t = job.table;
  const int64_t d = t.d;
  const int64_t bytes = d * dtype_size(T);
  float* buf = scratch(d, 0);
  for (int64_t r = r0; r < r1; ++r) {
    const char* src = static_cast<const char*>(job.h) + r * bytes;
    char* dst = static_cast<char*>(job.out) + r * bytes;
    const int64_t e = entry_of(job, r) - 1;
    const bool more = r + 1 < r1;
    if (job.residual) {  // add_steer: dst = steer(T(src + residual)); the sum is written first
      const char* res = static_cast<const char*>(job.residual) + r * bytes;
      // a row to steer is written once, steered (the sum stays in buf)
      const RowSums sums = read_row<T, true>(src, res, e >= 0 ? nullptr : dst, buf, d,
                                             e >= 0 ? first_direction(t, e) : nullptr,
                                             e >= 0 ? condition_direction(t, e) : nullptr,
                                             more ? src + bytes : nullptr, more ? res + bytes : nullptr);
      if (e < 0) continue;
      if (condition_holds(t, e, sums)) apply_entry<T>(t, e, buf, sums, dst, false);
      else store_buf<T>(buf, dst, d);
      continue;
    }
    if (e < 0) {
      if (dst != src) std::memcpy(dst, src, bytes);  // in place (steer_): already there
      continue;
    }
    const RowSums sums = read_row<T, false>(src, nullptr, nullptr, buf, d, first_direction(t, e),
                                            condition_direction(t, e), more ? src + bytes : nullptr, nullptr);
    if (!condition_holds(t, e, sums)) {
      if (dst != src) std::memcpy(dst, src, bytes);
      continue;
    }
    apply_entry<T>(t, e, buf, sums, dst, false);
  }
}

// y = (r * rstd) * (weight + offset), rstd = 1 / sqrt(mean(r^2) + eps)
template <DType T, DType WT>
void rms_row(const float* buf, float ss, const void* weight, float eps, float offset, void* y, int64_t d) {
  const float rstd = 1.0f / std::sqrt(ss / float(d) + eps);
  each(d, [&](auto o, int64_t i) {
    using O = decltype(o);
    auto wo = O::add(O::template ld<WT>(weight, i), O::set(offset));
    O::template st<T>(y, i, O::mul(O::mul(O::load(buf + i), O::set(rstd)), wo));
  });
}

template <DType T, DType WT>
void add_steer_rmsnorm_rows_t(const SteerJob& job, int64_t r0, int64_t r1) {
  const SteerTableView& t = job.table;
  const int64_t d = t.d;
  const int64_t bytes = d * dtype_size(T);
  float* buf = scratch(d, 0);
  for (int64_t r = r0; r < r1; ++r) {
    const char* x = static_cast<const char*>(job.h) + r * bytes;
    char* res_out = static_cast<char*>(job.out) + r * bytes;
    char* y = static_cast<char*>(job.y) + r * bytes;
    const int64_t e = entry_of(job, r) - 1;
    const float* p0 = e >= 0 ? first_direction(t, e) : nullptr;
    const float* p1 = e >= 0 ? condition_direction(t, e) : nullptr;
    const bool more = r + 1 < r1;
    RowSums sums;
    if (job.residual) {
      // a row to steer is written once, steered (the sum stays in buf)
      const char* res = static_cast<const char*>(job.residual) + r * bytes;
      sums = read_row<T, true>(x, res, e >= 0 ? nullptr : res_out, buf, d, p0, p1, more ? x + bytes : nullptr,
                               more ? res + bytes : nullptr);
    } else {
      sums = read_row<T, false>(x, nullptr, nullptr, buf, d, p0, p1, more ? x + bytes : nullptr, nullptr);
    }
    float ss = sums.ss;
    if (e >= 0 && condition_holds(t, e, sums)) {
      ss = apply_entry<T>(t, e, buf, sums, res_out, true);
    } else if (!job.residual) {
      std::memcpy(res_out, x, bytes);  // bit-exact, NaN payloads included
    } else if (e >= 0) {
      store_buf<T>(buf, res_out, d);  // its condition failed: the sum, unsteered
    }
    rms_row<T, WT>(buf, ss, job.weight, job.eps, job.weight_offset, y, d);
  }
}

template <DType T>
void scores_t(const void* x, const float* scale, int64_t n, float* xf, float* score) {
  each(n, [&](auto o, int64_t i) {
    using O = decltype(o);
    auto v = O::template ld<T>(x, i);
    O::store(xf + i, v);
    auto s = O::abs(v);
    if (scale) s = O::mul(s, O::load(scale + i));
    O::store(score + i, s);
  });
}

// acc[b, :n] += sum_g coef[b, j+g] * Wt[idx[j+g], t0:t0+n] for G active rows.
template <int B, int G, DType WT>
inline void rows_pass(const SparseJob& job, int64_t j, int64_t t0, int64_t n, float* acc, int64_t tc) {
  const char* w[G];
  float c[B][G];
  const int64_t es = dtype_size(WT);
  for (int g = 0; g < G; ++g) {
    w[g] = static_cast<const char*>(job.wt) + (int64_t(job.idx[j + g]) * job.out + t0) * es;
    for (int b = 0; b < B; ++b) c[b][g] = job.coef[b * job.coef_ld + j + g];
  }
  each(n, [&](auto o, int64_t i) {
    using O = decltype(o);
    typename O::T wv[G];
    for (int g = 0; g < G; ++g) wv[g] = O::template ld<WT>(w[g], i);
    for (int b = 0; b < B; ++b) {
      auto a = O::load(acc + b * tc + i);
      for (int g = 0; g < G; ++g) a = O::fma(O::set(c[b][g]), wv[g], a);
      O::store(acc + b * tc + i, a);
    }
  });
}

template <DType YT>
void store_row(const float* acc, const float* bias, void* y, int64_t n) {
  each(n, [&](auto o, int64_t i) {
    using O = decltype(o);
    auto v = O::load(acc + i);
    if (bias) v = O::add(v, O::load(bias + i));
    O::template st<YT>(y, i, v);
  });
}

#if SK_ISA > 0
// The bf16 form of rows_pass: blocks of 2W columns kept as [W even | W odd]
// in acc; the tail (n % 2W columns) in natural order after the blocks.
template <int B, int G>
inline void rows_pass_bf16(const SparseJob& job, int64_t j, int64_t t0, int64_t n, float* acc, int64_t tc) {
  const uint16_t* w[G];
  const char* pf[G];  // the rows of the next pass, fetched into L2 one pass ahead
  float c[B][G];
  for (int g = 0; g < G; ++g) {
    w[g] = static_cast<const uint16_t*>(job.wt) + int64_t(job.idx[j + g]) * job.out + t0;
    const int64_t jn = std::min<int64_t>(j + G + g, job.nact - 1);
    pf[g] = reinterpret_cast<const char*>(static_cast<const uint16_t*>(job.wt) + int64_t(job.idx[jn]) * job.out + t0);
    for (int b = 0; b < B; ++b) c[b][g] = job.coef[b * job.coef_ld + j + g];
  }
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    for (int g = 0; g < G; ++g) __builtin_prefetch(pf[g] + i * 2, 0, 2);  // 0: read, 2: into L2
    vf ev[G], od[G];
    for (int g = 0; g < G; ++g) vload_bf16_split(w[g] + i, ev[g], od[g]);
    for (int b = 0; b < B; ++b) {
      float* a = acc + b * tc + i;
      vf ae = vload_f32(a), ao = vload_f32(a + W);
      for (int g = 0; g < G; ++g) {
        const vf cg = vset(c[b][g]);
        ae = vfma(cg, ev[g], ae);
        ao = vfma(cg, od[g], ao);
      }
      vstore_f32(a, ae);
      vstore_f32(a + W, ao);
    }
  }
  if (i < n) rows_pass<B, G, DType::BF16>(job, j, t0 + i, n - i, acc + i, tc);  // the tail, natural order
}

// Back to natural column order: [W even | W odd] -> interleaved, per block.
inline void unsplit(float* acc, int64_t n) {
  float tmp[2 * W];
  for (int64_t i = 0; i + 2 * W <= n; i += 2 * W) {
    for (int64_t m = 0; m < W; ++m) {
      tmp[2 * m] = acc[i + m];
      tmp[2 * m + 1] = acc[i + W + m];
    }
    std::memcpy(acc + i, tmp, sizeof(tmp));
  }
}
#endif

#if SK_ISA == 3
// The AVX512-BF16 form of the bf16 pass, for coefficients that are exactly
// bf16 (bf16 activations): two active rows a < b are interleaved word by
// word, b in the low and a in the high half of each 32-bit lane, and
// vdpbf16ps adds the high product and then the low one, each rounded (the
// documented order, checked on the hardware).  A bf16 x bf16 product is exact
// in fp32, so a lane gets the same two fused multiply-adds, in the same row
// order, as the widening pass: the results are bit-identical to it, and rows
// of a batch stay equal to rows alone, except that the instruction treats
// subnormal inputs and results (below 1.2e-38) as zero.  It does in one
// instruction what the widening pass does in five.  Per block of 2W columns
// the lanes hold, per 128-bit quarter q, columns 8q..8q+3 (first W) and
// 8q+4..8q+7 (second W); unpair() restores the natural order.  `rows` is 2P,
// or 1 for a last odd row (paired with itself at coefficient 0).
inline uint32_t bf16_bits(float c) { return f32_to_bits(c) >> 16; }

template <int B, int P>
inline void rows_pass_dp(const SparseJob& job, int64_t j, int rows, int64_t t0, int64_t n, float* acc, int64_t tc) {
  const uint16_t* w[2 * P];
  const char* pf[2 * P];
  __m512bh c[B][P];
  const auto* wt = static_cast<const uint16_t*>(job.wt);
  for (int g = 0; g < 2 * P; ++g) {
    const int64_t jg = j + std::min(g, rows - 1);
    w[g] = wt + int64_t(job.idx[jg]) * job.out + t0;
    const int64_t jn = std::min<int64_t>(j + rows + g, job.nact - 1);
    pf[g] = reinterpret_cast<const char*>(wt + int64_t(job.idx[jn]) * job.out + t0);
  }
  for (int b = 0; b < B; ++b) {
    const float* cb = job.coef + b * job.coef_ld + j;
    for (int p = 0; p < P; ++p) {
      const uint32_t hi = bf16_bits(cb[2 * p]);
      const uint32_t lo = 2 * p + 1 < rows ? bf16_bits(cb[2 * p + 1]) : 0u;
      c[b][p] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(int(lo | (hi << 16))));
    }
  }
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    for (int g = 0; g < 2 * P; ++g) __builtin_prefetch(pf[g] + i * 2, 0, 2);  // 0: read, 2: into L2
    __m512bh lo[P], hi[P];
    for (int p = 0; p < P; ++p) {
      const __m512i a = _mm512_loadu_si512(w[2 * p] + i), b = _mm512_loadu_si512(w[2 * p + 1] + i);
      lo[p] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(b, a));
      hi[p] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(b, a));
    }
    for (int b = 0; b < B; ++b) {
      float* a = acc + b * tc + i;
      vf al = vload_f32(a), ah = vload_f32(a + W);
      for (int p = 0; p < P; ++p) {
        al = _mm512_dpbf16_ps(al, lo[p], c[b][p]);
        ah = _mm512_dpbf16_ps(ah, hi[p], c[b][p]);
      }
      vstore_f32(a, al);
      vstore_f32(a + W, ah);
    }
  }
  if (i < n) {  // the tail, natural order
    if (rows == 2 * P) rows_pass<B, 2 * P, DType::BF16>(job, j, t0 + i, n - i, acc + i, tc);
    else rows_pass<B, 1, DType::BF16>(job, j, t0 + i, n - i, acc + i, tc);
  }
}

inline void unpair(float* acc, int64_t n) {
  float tmp[2 * W];
  for (int64_t i = 0; i + 2 * W <= n; i += 2 * W) {
    for (int64_t q = 0; q < 4; ++q)
      for (int64_t k = 0; k < 4; ++k) {
        tmp[8 * q + k] = acc[i + 4 * q + k];
        tmp[8 * q + 4 + k] = acc[i + W + 4 * q + k];
      }
    std::memcpy(acc + i, tmp, sizeof(tmp));
  }
}
#endif

// Active rows streamed per pass: 8 concurrent row streams keep enough cache
// misses in flight (measured: 4 rows reach ~25% less bandwidth on bf16), and
// the accumulator tile is loaded and stored once per 8 rows.  The bf16 pass
// also prefetches the next pass's rows into L2: the hardware prefetchers
// must re-learn every short row, and this was 4-18% faster in a decode-like
// sequence of TinyLlama projections (no gain measured for fp32).
constexpr int kRowsPerPass = 8;
// The accumulator tile: 4096 floats (16 KiB, L1) shared by the B rows, but
// never narrower than 2048 columns: each active row is then read in runs of
// at least 8 KiB (fp32), which DRAM streams well; shorter runs cost more in
// bandwidth than the accumulators cost in L2 traffic.
constexpr int64_t kTileFloats = 4096;
constexpr int64_t kMinTileColumns = 2048;

template <int B, DType WT>
void sparse_cols_t(const SparseJob& job, int64_t c0, int64_t c1) {
  constexpr int G = kRowsPerPass;
  // tiles are whole blocks of 2W columns (the bf16 split layout needs them)
  const int64_t tc_max = std::max(kTileFloats / B, kMinTileColumns) / (2 * W) * (2 * W);
  const int64_t ncols = c1 - c0;
  if (ncols <= 0) return;
  const int64_t ntiles = (ncols + tc_max - 1) / tc_max;
  const int64_t tc = ((ncols + ntiles - 1) / ntiles + 2 * W - 1) / (2 * W) * (2 * W);
  float* acc = scratch(B * tc, 1);
  const int64_t ys = dtype_size(job.ydt);
  for (int64_t t0 = c0; t0 < c1; t0 += tc) {
    const int64_t n = std::min(tc, c1 - t0);
    std::memset(acc, 0, sizeof(float) * B * tc);
    int64_t j = 0;
#if SK_ISA > 0
    if constexpr (WT == DType::BF16) {
#if SK_ISA == 3
      if (job.coef_bf16) {
        for (; j + G <= job.nact; j += G) rows_pass_dp<B, G / 2>(job, j, G, t0, n, acc, tc);
        for (; j < job.nact; j += 2) rows_pass_dp<B, 1>(job, j, int(std::min<int64_t>(2, job.nact - j)), t0, n, acc, tc);
        for (int b = 0; b < B; ++b) unpair(acc + b * tc, n);
      } else
#endif
      {
        for (; j + G <= job.nact; j += G) rows_pass_bf16<B, G>(job, j, t0, n, acc, tc);
        for (; j < job.nact; ++j) rows_pass_bf16<B, 1>(job, j, t0, n, acc, tc);
        for (int b = 0; b < B; ++b) unsplit(acc + b * tc, n);
      }
    }
#endif
    for (; j + G <= job.nact; j += G) rows_pass<B, G, WT>(job, j, t0, n, acc, tc);
    for (; j < job.nact; ++j) rows_pass<B, 1, WT>(job, j, t0, n, acc, tc);
    const float* bias = job.bias ? job.bias + t0 : nullptr;
    for (int b = 0; b < B; ++b) {
      void* y = static_cast<char*>(job.y) + (b * job.out + t0) * ys;
      switch (job.ydt) {
        case DType::F32: store_row<DType::F32>(acc + b * tc, bias, y, n); break;
        case DType::BF16: store_row<DType::BF16>(acc + b * tc, bias, y, n); break;
        case DType::F16: store_row<DType::F16>(acc + b * tc, bias, y, n); break;
      }
    }
  }
}

template <int B>
void sparse_cols_b(const SparseJob& job, int64_t c0, int64_t c1) {
  switch (job.wdt) {
    case DType::F32: sparse_cols_t<B, DType::F32>(job, c0, c1); break;
    case DType::BF16: sparse_cols_t<B, DType::BF16>(job, c0, c1); break;
    case DType::F16: sparse_cols_t<B, DType::F16>(job, c0, c1); break;
  }
}

// ---------------------------------------------------------------- attention
// One decode step of attention per (b, h): s_l = scale * q . k_l, p =
// softmax(s), out = sum_l p_l v_l, all in fp32 and rounded once to T (the
// spec: steerkern/ops/reference.py, decode_attention).  Grouped-query heads
// read their group's K/V row (h / (H / KVH)); K and V are read once per head.
template <DType T>
void attend_t(const AttnJob& job, int64_t r0, int64_t r1) {
  const int64_t D = job.D, L = job.L, group = job.H / job.KVH, es = dtype_size(T);
  float* qf = scratch(2 * D + L, 5);
  float* acc = qf + D;
  float* s = acc + D;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / job.H, h = r % job.H, g = h / group;
    const char* q = static_cast<const char*>(job.q) + (b * job.q_sb + h * job.q_sh) * es;
    const char* k = static_cast<const char*>(job.k) + (b * job.k_sb + g * job.k_sh) * es;
    const char* v = static_cast<const char*>(job.v) + (b * job.v_sb + g * job.v_sh) * es;
    each(D, [&](auto o, int64_t i) {
      using O = decltype(o);
      O::store(qf + i, O::template ld<T>(q, i));
    });
    float m = -INFINITY;
    int64_t l = 0;
    // four keys at a time: four independent sums hide the FMA and the
    // horizontal-add latencies that one running dot product would wait on
    for (; l + 4 <= L; l += 4) {
      const char* k0 = k + l * job.k_sl * es;
      const char* k1 = k0 + job.k_sl * es;
      const char* k2 = k1 + job.k_sl * es;
      const char* k3 = k2 + job.k_sl * es;
      Sum d0, d1, d2, d3;
      each(D, [&](auto o, int64_t i) {
        using O = decltype(o);
        const auto x = O::load(qf + i);
        sum_fma(d0, x, O::template ld<T>(k0, i));
        sum_fma(d1, x, O::template ld<T>(k1, i));
        sum_fma(d2, x, O::template ld<T>(k2, i));
        sum_fma(d3, x, O::template ld<T>(k3, i));
      });
      s[l] = d0.total() * job.scale;
      s[l + 1] = d1.total() * job.scale;
      s[l + 2] = d2.total() * job.scale;
      s[l + 3] = d3.total() * job.scale;
      m = std::max(std::max(m, std::max(s[l], s[l + 1])), std::max(s[l + 2], s[l + 3]));
    }
    for (; l < L; ++l) {
      const char* kl = k + l * job.k_sl * es;
      Sum dotp;
      each(D, [&](auto o, int64_t i) {
        using O = decltype(o);
        sum_fma(dotp, O::load(qf + i), O::template ld<T>(kl, i));
      });
      s[l] = dotp.total() * job.scale;
      m = std::max(m, s[l]);
    }
    float z = 0.0f;
    for (l = 0; l < L; ++l) {
      s[l] = std::exp(s[l] - m);
      z += s[l];
    }
    std::memset(acc, 0, sizeof(float) * D);
    for (l = 0; l + 4 <= L; l += 4) {
      const char* v0 = v + l * job.v_sl * es;
      const char* v1 = v0 + job.v_sl * es;
      const char* v2 = v1 + job.v_sl * es;
      const char* v3 = v2 + job.v_sl * es;
      const float p0 = s[l], p1 = s[l + 1], p2 = s[l + 2], p3 = s[l + 3];
      each(D, [&](auto o, int64_t i) {
        using O = decltype(o);
        auto a = O::fma(O::set(p0), O::template ld<T>(v0, i), O::load(acc + i));
        a = O::fma(O::set(p1), O::template ld<T>(v1, i), a);
        a = O::fma(O::set(p2), O::template ld<T>(v2, i), a);
        O::store(acc + i, O::fma(O::set(p3), O::template ld<T>(v3, i), a));
      });
    }
    for (; l < L; ++l) {
      const char* vl = v + l * job.v_sl * es;
      const float p = s[l];
      each(D, [&](auto o, int64_t i) {
        using O = decltype(o);
        O::store(acc + i, O::fma(O::set(p), O::template ld<T>(vl, i), O::load(acc + i)));
      });
    }
    const float inv = 1.0f / z;
    void* out = static_cast<char*>(job.out) + r * D * es;
    each(D, [&](auto o, int64_t i) {
      using O = decltype(o);
      O::template st<T>(out, i, O::mul(O::load(acc + i), O::set(inv)));
    });
  }
}

// ---------------------------------------------------------------- entry points
void steer_rows(const SteerJob& job, int64_t r0, int64_t r1) {
  switch (job.dt) {
    case DType::F32: steer_rows_t<DType::F32>(job, r0, r1); break;
    case DType::BF16: steer_rows_t<DType::BF16>(job, r0, r1); break;
    case DType::F16: steer_rows_t<DType::F16>(job, r0, r1); break;
  }
}

template <DType T>
void add_steer_rmsnorm_rows_w(const SteerJob& job, int64_t r0, int64_t r1) {
  switch (job.wdt) {
    case DType::F32: add_steer_rmsnorm_rows_t<T, DType::F32>(job, r0, r1); break;
    case DType::BF16: add_steer_rmsnorm_rows_t<T, DType::BF16>(job, r0, r1); break;
    case DType::F16: add_steer_rmsnorm_rows_t<T, DType::F16>(job, r0, r1); break;
  }
}

void add_steer_rmsnorm_rows(const SteerJob& job, int64_t r0, int64_t r1) {
  switch (job.dt) {
    case DType::F32: add_steer_rmsnorm_rows_w<DType::F32>(job, r0, r1); break;
    case DType::BF16: add_steer_rmsnorm_rows_w<DType::BF16>(job, r0, r1); break;
    case DType::F16: add_steer_rmsnorm_rows_w<DType::F16>(job, r0, r1); break;
  }
}

void scores(const void* x, DType xdt, const float* scale, int64_t n, float* xf, float* score) {
  switch (xdt) {
    case DType::F32: scores_t<DType::F32>(x, scale, n, xf, score); break;
    case DType::BF16: scores_t<DType::BF16>(x, scale, n, xf, score); break;
    case DType::F16: scores_t<DType::F16>(x, scale, n, xf, score); break;
  }
}

void sparse_cols(const SparseJob& job, int64_t c0, int64_t c1) {
  switch (job.B) {
    case 1: sparse_cols_b<1>(job, c0, c1); break;
    case 2: sparse_cols_b<2>(job, c0, c1); break;
    case 3: sparse_cols_b<3>(job, c0, c1); break;
    case 4: sparse_cols_b<4>(job, c0, c1); break;
    case 5: sparse_cols_b<5>(job, c0, c1); break;
    case 6: sparse_cols_b<6>(job, c0, c1); break;
    case 7: sparse_cols_b<7>(job, c0, c1); break;
    case 8: sparse_cols_b<8>(job, c0, c1); break;
    default: break;  // the ATen layer never asks for more than 8 rows
  }
}

void attend(const AttnJob& job, int64_t r0, int64_t r1) {
  switch (job.dt) {
    case DType::F32: attend_t<DType::F32>(job, r0, r1); break;
    case DType::BF16: attend_t<DType::BF16>(job, r0, r1); break;
    case DType::F16: attend_t<DType::F16>(job, r0, r1); break;
  }
}

}  // namespace

Kernels make_kernels(const char* name) {
  return Kernels{name, steer_rows, add_steer_rmsnorm_rows, scores, sparse_cols, attend};
}
