// decode_attention: one query token per (batch row, head) against the KV
// cache, no mask (steerkern/ops/reference.py, decode_attention, is the spec).
// The (row, head) pairs are split over threads when there is enough work to
// pay for them; each pair reads its K/V group once (isa_impl.h: attend).
#include <ATen/Parallel.h>

#include "ops.h"

namespace steerkern {
namespace cpu {
namespace {

// below this many multiply-adds one thread is faster than waking the others
constexpr int64_t kMinParallelWork = 1 << 18;

void check_heads(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 4, name, ": expected a 4-D [batch, heads, length, head_dim] tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": dtype ", t.scalar_type(), " differs from q's ",
              q.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name, ": the head dimension must be contiguous (stride 1), got "
              "strides ", t.strides());
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  float_dtype(q, "q");
  check_heads(q, "q", q);
  check_heads(k, "k", q);
  check_heads(v, "v", q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), L = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "q: decode_attention takes one query token per row, got ", q.size(2));
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "k, v: batch ", k.size(0), " and ", v.size(0), " differ from q's ", B);
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, "k, v: head_dim ", k.size(3), " and ", v.size(3),
              " differ from q's ", D);
  TORCH_CHECK(v.size(1) == KVH && v.size(2) == L, "v: shape ", v.sizes(), " differs from k's ", k.sizes());
  TORCH_CHECK(KVH >= 1 && H % KVH == 0, "k: ", KVH, " key/value heads do not divide q's ", H, " heads");
  TORCH_CHECK(L >= 1, "k: no cached positions to attend to");
  at::Tensor out = at::empty({B, 1, H, D}, q.options());
  if (B == 0 || H == 0 || D == 0) return out;
  AttnJob job;
  job.B = B, job.H = H, job.KVH = KVH, job.L = L, job.D = D;
  job.q = q.data_ptr(), job.q_sb = q.stride(0), job.q_sh = q.stride(1);
  job.k = k.data_ptr(), job.k_sb = k.stride(0), job.k_sh = k.stride(1), job.k_sl = k.stride(2);
  job.v = v.data_ptr(), job.v_sb = v.stride(0), job.v_sh = v.stride(1), job.v_sl = v.stride(2);
  job.out = out.data_ptr();
  job.dt = float_dtype(q, "q");
  job.scale = float(scale);
  const Kernels& kern = kernels();
  const int64_t pairs = B * H, work = pairs * L * D * 2;
  if (work < kMinParallelWork || at::in_parallel_region()) {
    kern.attend(job, 0, pairs);
  } else {
    const int64_t grain = std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, L * D * 2));
    at::parallel_for(0, pairs, grain, [&](int64_t r0, int64_t r1) { kern.attend(job, r0, r1); });
  }
  return out;
}

}  // namespace cpu
}  // namespace steerkern
