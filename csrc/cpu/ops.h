// The ATen-level entry points of the CPU backend: the kernel-level signatures
// of steerkern/ops/library.py (schema arguments minus `backend`), on 2-D
// contiguous row tensors with a flat int32 index or none.  Every argument is
// checked with TORCH_CHECK, so bad input from C++ is an error, not a crash.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace steerkern {
namespace cpu {

using OptTensor = std::optional<at::Tensor>;

at::Tensor steer(const at::Tensor& h, const OptTensor& index, const OptTensor& basis, const OptTensor& target,
                 const OptTensor& gain, const OptTensor& vec, const OptTensor& alpha, const OptTensor& scale,
                 const OptTensor& shift, const OptTensor& cond_dir, const OptTensor& cond_threshold,
                 const OptTensor& preserve_norm);

// steer, written back into h
void steer_(const at::Tensor& h, const OptTensor& index, const OptTensor& basis, const OptTensor& target,
            const OptTensor& gain, const OptTensor& vec, const OptTensor& alpha, const OptTensor& scale,
            const OptTensor& shift, const OptTensor& cond_dir, const OptTensor& cond_threshold,
            const OptTensor& preserve_norm);

// steer(residual + x) in a new tensor (the sum rounded to the dtype first), for
// a layer's post-MLP site: the residual add and the steer in one pass.
at::Tensor add_steer(const at::Tensor& residual, const at::Tensor& x, const OptTensor& index,
                     const OptTensor& basis, const OptTensor& target, const OptTensor& gain, const OptTensor& vec,
                     const OptTensor& alpha, const OptTensor& scale, const OptTensor& shift,
                     const OptTensor& cond_dir, const OptTensor& cond_threshold, const OptTensor& preserve_norm);

std::tuple<at::Tensor, at::Tensor> add_steer_rmsnorm(
    const at::Tensor& x, const OptTensor& residual, const at::Tensor& weight, double eps, double weight_offset,
    const OptTensor& index, const OptTensor& basis, const OptTensor& target, const OptTensor& gain,
    const OptTensor& vec, const OptTensor& alpha, const OptTensor& scale, const OptTensor& shift,
    const OptTensor& cond_dir, const OptTensor& cond_threshold, const OptTensor& preserve_norm);

// add_steer_rmsnorm in place, as vLLM's fused_add_rms_norm: residual <- r, x <- y
void add_steer_rmsnorm_(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
                        double weight_offset, const OptTensor& index, const OptTensor& basis,
                        const OptTensor& target, const OptTensor& gain, const OptTensor& vec,
                        const OptTensor& alpha, const OptTensor& scale, const OptTensor& shift,
                        const OptTensor& cond_dir, const OptTensor& cond_threshold, const OptTensor& preserve_norm);

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight_t, const OptTensor& bias,
                         const OptTensor& scale, const at::Tensor& threshold, int64_t topk);

// sparse_linear of one x through several weights (the parts of a fused
// projection, or sibling projections such as q/k/v): x of any leading shape,
// each output [..., out_p]; threshold masks only.  At decode batch sizes the
// parts share one parallel region.
std::vector<at::Tensor> sparse_linear_parts(const at::Tensor& x, const std::vector<at::Tensor>& weight_ts,
                                            const std::vector<OptTensor>& biases,
                                            const std::vector<OptTensor>& scales,
                                            const std::vector<at::Tensor>& thresholds);

at::Tensor steer_sparse_linear(const at::Tensor& h, const OptTensor& index, const OptTensor& basis,
                               const OptTensor& target, const OptTensor& gain, const OptTensor& vec,
                               const OptTensor& alpha, const OptTensor& scale, const OptTensor& shift,
                               const OptTensor& cond_dir, const OptTensor& cond_threshold,
                               const OptTensor& preserve_norm, const at::Tensor& weight_t, const OptTensor& bias,
                               const OptTensor& col_scale, const at::Tensor& threshold, int64_t topk);

// Attention of one query token per row and head over the KV cache, no mask:
// q [B, H, 1, D], k and v [B, KVH, L, D] (any strides but the head
// dimension's), H a multiple of KVH; returns [B, 1, H, D], fp32 inside.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

// ---- argument checks shared by the ops

// fp32, bf16 or fp16, else an error naming `name`.
DType float_dtype(const at::Tensor& t, const char* name);

// A CPU, 2-D, contiguous fp32/bf16/fp16 tensor.
void check_rows(const at::Tensor& t, const char* name);

// A CPU, contiguous, 1-D tensor of n elements in a float dtype.
void check_vector(const at::Tensor& t, int64_t n, const char* name);

}  // namespace cpu
}  // namespace steerkern
