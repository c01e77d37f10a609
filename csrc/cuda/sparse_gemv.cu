// Split-K sparse GEMV over the active input rows of W^T, for decode batches.
//
// Math (steerkern/ops/reference.py): y[b] = sum_i m[b,i] x[b,i] W^T[i,:] (+ the
// bias, already in the workspace), with m[b,i] = not(|x[b,i]| * s_i <= t) --
// decided here, reading t from device memory -- or a precomputed top-k mask.
//
// Layout: x [rows, n_in] contiguous in any float dtype, W^T [n_in, n_out]
// contiguous (fp32/fp16/bf16), workspace fp32 [rows, n_out].  A block owns
// kThreads * VEC outputs, one split of K (rows_per_split input rows) and up
// to NB rows of x.  It first compacts the inputs active in any of its rows
// (with each row's masked value) into shared memory, then streams only
// those rows of W^T -- one 16-byte load per thread per row -- and masks each
// row of x on its own.  Inactive inputs cost no weight load at all.
//
// Bound: memory: (1 - union sparsity) * n_in * n_out * itemsize bytes of W^T,
// plus fp32 atomics of rows * n_out per split.

#include "common.cuh"

namespace steerkern_cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;           // weight rows in flight per thread
constexpr int kProgramsPerSm = 4;    // target blocks per SM
constexpr int kMinRowsPerSplit = 64;
constexpr int kMaxRowsPerSplit = 1024;  // bounds the shared memory

template <typename W, int VEC>
struct alignas(sizeof(W) * VEC) WVec {
  W v[VEC];
};

template <typename W, int NB, int VEC>
__global__ void __launch_bounds__(kThreads) sparse_gemv_kernel(SparseGemv a, int rows_per_split) {
  extern __shared__ float smem[];
  float* xs = smem;                                              // [NB][rows_per_split]
  int* active = reinterpret_cast<int*>(smem + NB * rows_per_split);  // [rows_per_split]
  __shared__ int warp_count[kWarps];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t k_lo = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t k_hi = min(k_lo + rows_per_split, a.n_in);
  const int64_t b0 = static_cast<int64_t>(blockIdx.z) * NB;
  const int nb = a.rows - b0 < NB ? static_cast<int>(a.rows - b0) : NB;
  const float t = *a.threshold;

  // 1. compact the inputs active in any row, keeping their order
  int n_active = 0;
  for (int64_t base = k_lo; base < k_hi; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    float xm[NB];
    bool any = false;
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      xm[b] = 0.f;
      if (b < nb && i < k_hi) {
        const int64_t at = (b0 + b) * a.n_in + i;
        const float xv = load_f32(a.x, a.x_dtype, at);
        bool on;
        if (a.mask != nullptr) {
          on = a.mask[at] != 0;
        } else {
          const float score = fabsf(xv) * (a.scale != nullptr ? a.scale[i] : 1.f);
          on = !(score <= t);  // NaN stays active, as in a dense layer
        }
        if (on) {
          xm[b] = xv;
          any = true;
        }
      }
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, any);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int pos = n_active + __popc(ballot & ((1u << lane) - 1u));
    int total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) pos += warp_count[w];
      total += warp_count[w];
    }
    if (any) {
      active[pos] = static_cast<int>(i - k_lo);
#pragma unroll
      for (int b = 0; b < NB; ++b) xs[b * rows_per_split + pos] = xm[b];
    }
    n_active += total;
    __syncthreads();
  }
  if (n_active == 0) return;

  // 2. stream the active rows of W^T
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (col >= a.n_out) return;  // VEC divides n_out: a vector is all in or all out
  const W* wt = static_cast<const W*>(a.weight_t) + k_lo * a.n_out + col;
  float acc[NB][VEC] = {};
  int j = 0;
  for (; j + kUnroll <= n_active; j += kUnroll) {
    WVec<W, VEC> w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      w[u] = *reinterpret_cast<const WVec<W, VEC>*>(wt + static_cast<int64_t>(active[j + u]) * a.n_out);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const float xv = xs[b * rows_per_split + j + u];
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[b][v] += xv * to_f32(w[u].v[v]);
      }
  }
  for (; j < n_active; ++j) {
    const WVec<W, VEC> w = *reinterpret_cast<const WVec<W, VEC>*>(wt + static_cast<int64_t>(active[j]) * a.n_out);
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      const float xv = xs[b * rows_per_split + j];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[b][v] += xv * to_f32(w.v[v]);
    }
  }

  // 3. add this split's partial sums (the workspace already holds the bias)
#pragma unroll
  for (int b = 0; b < NB; ++b)
    if (b < nb)
#pragma unroll
      for (int v = 0; v < VEC; ++v) atomicAdd(a.workspace + (b0 + b) * a.n_out + col + v, acc[b][v]);
}

int sm_count() {
  int device = 0, count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count > 0 ? count : 1;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename W, int NB, int VEC>
void launch(const SparseGemv& a, cudaStream_t stream) {
  const int64_t grid_n = cdiv(a.n_out, static_cast<int64_t>(kThreads) * VEC);
  const int64_t grid_b = cdiv(a.rows, NB);
  // enough blocks to fill the GPU, each with a useful run of input rows
  const int64_t splits_wanted = cdiv(static_cast<int64_t>(kProgramsPerSm) * sm_count(), grid_n * grid_b);
  int64_t per_split = cdiv(a.n_in, splits_wanted > 0 ? splits_wanted : 1);
  per_split = per_split < kMinRowsPerSplit ? kMinRowsPerSplit : per_split;
  per_split = per_split > kMaxRowsPerSplit ? kMaxRowsPerSplit : per_split;
  const dim3 grid(static_cast<unsigned>(grid_n), static_cast<unsigned>(cdiv(a.n_in, per_split)),
                  static_cast<unsigned>(grid_b));
  const size_t smem = sizeof(float) * NB * per_split + sizeof(int) * per_split;
  sparse_gemv_kernel<W, NB, VEC><<<grid, kThreads, smem, stream>>>(a, static_cast<int>(per_split));
}

template <typename W, int NB>
void launch_vec(const SparseGemv& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(W);
  const bool aligned = a.n_out % kVec == 0 && reinterpret_cast<uintptr_t>(a.weight_t) % 16 == 0;
  if (aligned) launch<W, NB, kVec>(a, stream);
  else launch<W, NB, 1>(a, stream);
}

template <typename W>
void launch_nb(const SparseGemv& a, cudaStream_t stream) {
  if (a.rows <= 1) launch_vec<W, 1>(a, stream);
  else if (a.rows <= 2) launch_vec<W, 2>(a, stream);
  else if (a.rows <= 4) launch_vec<W, 4>(a, stream);
  else launch_vec<W, 8>(a, stream);
}

}  // namespace

const char* launch_sparse_gemv(const SparseGemv& a, void* stream) {
  if (a.rows == 0 || a.n_in == 0 || a.n_out == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.w_dtype) {
    case DType::F32: launch_nb<float>(a, s); break;
    case DType::F16: launch_nb<__half>(a, s); break;
    case DType::BF16: launch_nb<__nv_bfloat16>(a, s); break;
  }
  return launch_error();
}

}  // namespace steerkern_cuda
