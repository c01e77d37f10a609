// steer and the fused add + steer + RMSNorm: one thread block per row.
//
// Math (steerkern/ops/reference.py): for row h of [rows, d] and entry
// e = index[row] (0 or out of range: no steering; no index: entry 1), in this
// order: condition cos(h, u_e) > thr_e, projection h + lam_e (c_e - Q_e h) Q_e,
// addition + alpha_e v_e, affine w_e * h + b_e, norm preservation.  The fused
// op steers r = round(x + residual) and then writes
// y = r * rsqrt(mean(r^2) + eps) * (weight + weight_offset) from the rounded r.
//
// Layout: rows are [rows, d] contiguous, the table is fp32 [K, ...], index is
// int32 [rows].  Thread t handles elements t, t + blockDim, ...; each pass
// re-reads the same elements by the same thread (L1 hits), so the written r
// is read back without a barrier.
//
// Bound: memory, rows * d * itemsize * (2..4) bytes plus the table rows of the
// entries in use (shared across rows through L2).  fp32 arithmetic, one
// rounding per output; an unsteered row is copied bit for bit.

#include "common.cuh"

namespace steerkern_cuda {
namespace {

constexpr float kTiny = 1e-30f;
constexpr int kCoeffChunk = 8;  // directions reduced together

template <typename T>
struct RowView {
  const T* x;
  const T* res;
  __device__ __forceinline__ T load(int64_t i) const {
    if (res == nullptr) return x[i];
    return from_f32<T>(to_f32(x[i]) + to_f32(res[i]));  // the unfused x + residual
  }
};

// Steps 2-4 for element i; delta[j] = c_j - (Q_e h)_j.
__device__ __forceinline__ float steered(float h, int64_t i, int64_t d, int ent,
                                         const SteerTable& t, const float* delta) {
  float y = h;
  if (t.basis != nullptr) {
    float p = 0.f;
    const float* q = t.basis + static_cast<int64_t>(ent) * t.k * d + i;
    for (int j = 0; j < t.k; ++j) p += delta[j] * q[j * d];
    y = y + t.gain[ent] * p;
  }
  if (t.vec != nullptr) y = y + t.alpha[ent] * t.vec[ent * d + i];
  if (t.scale != nullptr) y = y * t.scale[ent * d + i];
  if (t.shift != nullptr) y = y + t.shift[ent * d + i];
  return y;
}

constexpr int kMaxThreads = 1024;

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) steer_rows_kernel(SteerRows a) {
  extern __shared__ float delta[];  // [k]
  __shared__ float scratch[kCoeffChunk * 32];
  const SteerTable& t = a.table;
  const int64_t d = a.d;
  const int64_t row = blockIdx.x;
  const RowView<T> in{static_cast<const T*>(a.x) + row * d,
                      a.residual ? static_cast<const T*>(a.residual) + row * d : nullptr};
  T* r_out = static_cast<T*>(a.r_out) + row * d;

  // The index is read here; out of range cannot raise on the device, so it
  // means no steering (the Python layer rejects it before the launch).
  int e = a.index != nullptr ? a.index[row] : (t.K >= 1 ? 1 : 0);
  if (e < 0 || e > t.K) e = 0;
  const int ent = e > 0 ? e - 1 : 0;

  // 1. statistics of the input row: ||h||^2 and h . u_e
  float st[2] = {0.f, 0.f};
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float h = to_f32(in.load(i));
    st[0] += h * h;
    if (t.cond_dir != nullptr) st[1] += h * t.cond_dir[ent * d + i];
  }
  block_sum<2>(st, scratch);
  const float norm_in = sqrtf(st[0]);
  bool use = e > 0;
  if (t.cond_dir != nullptr) {
    const float cos = norm_in > 0.f ? st[1] / fmaxf(norm_in, kTiny) : 0.f;
    use = use && cos > t.cond_threshold[ent];
  }
  //    and the coefficients Q_e h, kCoeffChunk directions per pass
  if (t.basis != nullptr) {
    const float* qe = t.basis + static_cast<int64_t>(ent) * t.k * d;
    for (int j0 = 0; j0 < t.k; j0 += kCoeffChunk) {
      float c[kCoeffChunk] = {};
      const int nj = min(kCoeffChunk, t.k - j0);
      for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float h = to_f32(in.load(i));
#pragma unroll
        for (int jj = 0; jj < kCoeffChunk; ++jj)
          if (jj < nj) c[jj] += h * qe[(j0 + jj) * d + i];
      }
      block_sum<kCoeffChunk>(c, scratch);
      if (threadIdx.x == 0)
        for (int jj = 0; jj < nj; ++jj) delta[j0 + jj] = t.target[ent * t.k + j0 + jj] - c[jj];
    }
    __syncthreads();
  }

  // 2. norm of the steered row, when the entry preserves the norm
  float factor = 1.f;
  if (use && t.preserve_norm != nullptr && t.preserve_norm[ent] != 0) {
    float sy[1] = {0.f};
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const float y = steered(to_f32(in.load(i)), i, d, ent, t, delta);
      sy[0] += y * y;
    }
    block_sum<1>(sy, scratch);
    const float norm_y = sqrtf(sy[0]);
    if (norm_y > 0.f) factor = norm_in / fmaxf(norm_y, kTiny);
  }

  // 3. write r: steered and rounded once, or the loaded bits
  float sr[1] = {0.f};
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const T h = in.load(i);
    const T r = use ? from_f32<T>(steered(to_f32(h), i, d, ent, t, delta) * factor) : h;
    r_out[i] = r;
    const float rf = to_f32(r);
    sr[0] += rf * rf;
  }
  if (a.y_out == nullptr) return;

  // 4. RMSNorm of the rounded r (each thread reads back its own elements)
  block_sum<1>(sr, scratch);
  const float rstd = 1.f / sqrtf(sr[0] / static_cast<float>(d) + a.eps);
  T* y_out = static_cast<T*>(a.y_out) + row * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const float w = load_f32(a.norm_weight, a.norm_weight_dtype, i) + a.weight_offset;
    y_out[i] = from_f32<T>(to_f32(r_out[i]) * rstd * w);
  }
}

// About 8 elements per thread, in whole warps.
int threads_for(int64_t d) {
  int threads = 32;
  while (threads < kMaxThreads && threads * 8 < d) threads *= 2;
  return threads;
}

}  // namespace

const char* launch_steer_rows(const SteerRows& a, void* stream) {
  if (a.rows == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(a.rows));
  const int threads = threads_for(a.d);
  const size_t smem = sizeof(float) * (a.table.k > 0 ? a.table.k : 1);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::F32: steer_rows_kernel<float><<<grid, threads, smem, s>>>(a); break;
    case DType::F16: steer_rows_kernel<__half><<<grid, threads, smem, s>>>(a); break;
    case DType::BF16: steer_rows_kernel<__nv_bfloat16><<<grid, threads, smem, s>>>(a); break;
  }
  return launch_error();
}

}  // namespace steerkern_cuda
