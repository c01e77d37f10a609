// steer and add_steer_rmsnorm: argument checks, then the rows are split over
// threads and each chunk runs the ISA kernel (isa_impl.h: steer_rows,
// add_steer_rmsnorm_rows).  One read and one write of every row.
#include <ATen/Parallel.h>

#include "ops.h"

namespace steerkern {
namespace cpu {

DType float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, name, ": dtype ", t.scalar_type(), " not supported; expected float32, bfloat16 or float16");
  }
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D [rows, d] tensor, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  float_dtype(t, name);
}

void check_vector(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  float_dtype(t, name);
}

namespace {

const float* table_part(const OptTensor& t, const char* name, int64_t K, std::initializer_list<int64_t> tail) {
  if (!t.has_value()) return nullptr;
  const at::Tensor& x = *t;
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, name, ": expected float32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, ": expected a contiguous tensor");
  std::vector<int64_t> want{K};
  want.insert(want.end(), tail.begin(), tail.end());
  TORCH_CHECK(x.sizes() == at::IntArrayRef(want), name, ": expected shape ", at::IntArrayRef(want), ", got ",
              x.sizes());
  return x.data_ptr<float>();
}

void check_pair(const OptTensor& a, const char* an, const OptTensor& b, const char* bn) {
  TORCH_CHECK(a.has_value() == b.has_value(), an, " and ", bn, " must be given together");
}

// The table as plain pointers, every part checked against hidden size d.
// K comes from the first present part, as in reference._table_size.
SteerTableView table_view(int64_t d, const OptTensor& basis, const OptTensor& target, const OptTensor& gain,
                          const OptTensor& vec, const OptTensor& alpha, const OptTensor& scale,
                          const OptTensor& shift, const OptTensor& cond_dir, const OptTensor& cond_threshold,
                          const OptTensor& preserve_norm) {
  check_pair(basis, "basis", target, "target");
  check_pair(basis, "basis", gain, "gain");
  check_pair(vec, "vec", alpha, "alpha");
  check_pair(cond_dir, "cond_dir", cond_threshold, "cond_threshold");
  SteerTableView t;
  t.d = d;
  for (const OptTensor* p : {&basis, &vec, &scale, &shift, &cond_dir, &preserve_norm}) {
    if (p->has_value()) {
      TORCH_CHECK((*p)->dim() >= 1, "table tensors need a leading entry dimension");
      t.K = (*p)->size(0);
      break;
    }
  }
  if (basis.has_value()) {
    TORCH_CHECK(basis->dim() == 3, "basis: expected shape [K, k, ", d, "], got ", basis->sizes());
    t.k = basis->size(1);
  }
  t.basis = table_part(basis, "basis", t.K, {t.k, d});
  t.target = table_part(target, "target", t.K, {t.k});
  t.gain = table_part(gain, "gain", t.K, {});
  t.vec = table_part(vec, "vec", t.K, {d});
  t.alpha = table_part(alpha, "alpha", t.K, {});
  t.scale = table_part(scale, "scale", t.K, {d});
  t.shift = table_part(shift, "shift", t.K, {d});
  t.cond_dir = table_part(cond_dir, "cond_dir", t.K, {d});
  t.cond_thr = table_part(cond_threshold, "cond_threshold", t.K, {});
  if (preserve_norm.has_value()) {
    const at::Tensor& p = *preserve_norm;
    TORCH_CHECK(p.device().is_cpu(), "preserve_norm: expected a CPU tensor, got one on ", p.device());
    TORCH_CHECK(p.scalar_type() == at::kByte || p.scalar_type() == at::kBool,
                "preserve_norm: expected uint8 (or bool), got ", p.scalar_type());
    TORCH_CHECK(p.is_contiguous() && p.dim() == 1 && p.size(0) == t.K, "preserve_norm: expected a contiguous [",
                t.K, "] tensor, got shape ", p.sizes());
    t.preserve_norm = static_cast<const uint8_t*>(p.data_ptr());
  }
  return t;
}

// A flat int32 index of one entry per row, every value in [0, K].
const int32_t* index_view(const OptTensor& index, int64_t rows, int64_t K) {
  if (!index.has_value()) return nullptr;
  const at::Tensor& ix = *index;
  TORCH_CHECK(ix.device().is_cpu(), "index: expected a CPU tensor, got one on ", ix.device());
  TORCH_CHECK(ix.scalar_type() == at::kInt, "index: expected int32, got ", ix.scalar_type());
  TORCH_CHECK(ix.dim() == 1 && ix.size(0) == rows, "index: expected shape [", rows, "] (one entry per row), got ",
              ix.sizes());
  TORCH_CHECK(ix.is_contiguous(), "index: expected a contiguous tensor");
  const int32_t* p = ix.data_ptr<int32_t>();
  if (K > 0) {
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(p[r] >= 0 && p[r] <= K, "index: values must lie in [0, ", K, "] (0 = no steering), got ", p[r],
                  " at row ", r);
    }
  }
  return p;
}

SteerJob steer_job(const at::Tensor& h, const char* name, const OptTensor& index, const OptTensor& basis,
                   const OptTensor& target, const OptTensor& gain, const OptTensor& vec, const OptTensor& alpha,
                   const OptTensor& scale, const OptTensor& shift, const OptTensor& cond_dir,
                   const OptTensor& cond_threshold, const OptTensor& preserve_norm) {
  check_rows(h, name);
  SteerJob job;
  job.table = table_view(h.size(1), basis, target, gain, vec, alpha, scale, shift, cond_dir, cond_threshold,
                         preserve_norm);
  job.index = index_view(index, h.size(0), job.table.K);
  job.dt = float_dtype(h, name);
  job.h = h.data_ptr();
  return job;
}

// Rows split over threads; a chunk is at least ~32K elements so that one
// token runs inline in the calling thread.
template <class F>
void for_rows(int64_t rows, int64_t d, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, f);
}

}  // namespace

at::Tensor steer(const at::Tensor& h, const OptTensor& index, const OptTensor& basis, const OptTensor& target,
                 const OptTensor& gain, const OptTensor& vec, const OptTensor& alpha, const OptTensor& scale,
                 const OptTensor& shift, const OptTensor& cond_dir, const OptTensor& cond_threshold,
                 const OptTensor& preserve_norm) {
  SteerJob job = steer_job(h, "h", index, basis, target, gain, vec, alpha, scale, shift, cond_dir, cond_threshold,
                           preserve_norm);
  at::Tensor out = at::empty_like(h);
  if (job.table.K == 0) return out.copy_(h);
  job.out = out.data_ptr();
  const Kernels& kern = kernels();
  for_rows(h.size(0), h.size(1), [&](int64_t r0, int64_t r1) { kern.steer_rows(job, r0, r1); });
  return out;
}

void steer_(const at::Tensor& h, const OptTensor& index, const OptTensor& basis, const OptTensor& target,
            const OptTensor& gain, const OptTensor& vec, const OptTensor& alpha, const OptTensor& scale,
            const OptTensor& shift, const OptTensor& cond_dir, const OptTensor& cond_threshold,
            const OptTensor& preserve_norm) {
  SteerJob job = steer_job(h, "h", index, basis, target, gain, vec, alpha, scale, shift, cond_dir, cond_threshold,
                           preserve_norm);
  if (job.table.K == 0) return;
  job.out = h.data_ptr();
  const Kernels& kern = kernels();
  for_rows(h.size(0), h.size(1), [&](int64_t r0, int64_t r1) { kern.steer_rows(job, r0, r1); });
}

namespace {

void set_norm(SteerJob& job, const at::Tensor& x, const at::Tensor& weight, double eps, double weight_offset) {
  check_vector(weight, x.size(1), "weight");
  job.weight = weight.data_ptr();
  job.wdt = float_dtype(weight, "weight");
  job.eps = float(eps);
  job.weight_offset = float(weight_offset);
}

void check_residual(const at::Tensor& residual, const at::Tensor& x) {
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(), "residual: expected ",
              x.scalar_type(), " of shape ", x.sizes(), " (that of x), got ", residual.scalar_type(),
              " of shape ", residual.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> add_steer_rmsnorm(
    const at::Tensor& x_in, const OptTensor& residual_in, const at::Tensor& weight, double eps,
    double weight_offset, const OptTensor& index, const OptTensor& basis, const OptTensor& target,
    const OptTensor& gain, const OptTensor& vec, const OptTensor& alpha, const OptTensor& scale,
    const OptTensor& shift, const OptTensor& cond_dir, const OptTensor& cond_threshold,
    const OptTensor& preserve_norm) {
  // any leading shape (contiguous): a patched layer passes its [B, S, d]
  // streams as they are; r and y come back in x's shape
  TORCH_CHECK(x_in.dim() >= 1, "x: expected at least one dimension, got a scalar");
  const at::Tensor x = x_in.dim() == 2 || !x_in.is_contiguous() ? x_in : x_in.view({-1, x_in.size(-1)});
  OptTensor residual = residual_in;
  if (residual_in.has_value()) {
    TORCH_CHECK(residual_in->sizes() == x_in.sizes(), "residual: expected shape ", x_in.sizes(),
                " (that of x), got ", residual_in->sizes());
    if (residual_in->dim() != 2 && residual_in->is_contiguous()) residual = residual_in->view({-1, x.size(-1)});
  }
  SteerJob job = steer_job(x, "x", index, basis, target, gain, vec, alpha, scale, shift, cond_dir, cond_threshold,
                           preserve_norm);
  if (residual.has_value()) {
    check_residual(*residual, x);
    job.residual = residual->data_ptr();
  }
  set_norm(job, x, weight, eps, weight_offset);
  at::Tensor r = at::empty_like(x_in);
  at::Tensor y = at::empty_like(x_in);
  job.out = r.data_ptr();
  job.y = y.data_ptr();
  const Kernels& kern = kernels();
  for_rows(x.size(0), x.size(1), [&](int64_t r0, int64_t r1) { kern.add_steer_rmsnorm_rows(job, r0, r1); });
  return {r, y};
}

void add_steer_rmsnorm_(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
                        double weight_offset, const OptTensor& index, const OptTensor& basis,
                        const OptTensor& target, const OptTensor& gain, const OptTensor& vec,
                        const OptTensor& alpha, const OptTensor& scale, const OptTensor& shift,
                        const OptTensor& cond_dir, const OptTensor& cond_threshold, const OptTensor& preserve_norm) {
  SteerJob job = steer_job(x, "x", index, basis, target, gain, vec, alpha, scale, shift, cond_dir, cond_threshold,
                           preserve_norm);
  check_residual(residual, x);
  // r goes to residual and y to x: one buffer for both would lose r
  const int64_t bytes = x.numel() * x.element_size();
  const char* xp = static_cast<const char*>(x.data_ptr());
  const char* rp = static_cast<const char*>(residual.data_ptr());
  TORCH_CHECK(bytes == 0 || xp + bytes <= rp || rp + bytes <= xp, "residual: must not overlap x in the in-place op");
  set_norm(job, x, weight, eps, weight_offset);
  job.residual = residual.data_ptr();
  job.out = residual.data_ptr();
  job.y = x.data_ptr();
  const Kernels& kern = kernels();
  for_rows(x.size(0), x.size(1), [&](int64_t r0, int64_t r1) { kern.add_steer_rmsnorm_rows(job, r0, r1); });
}

at::Tensor add_steer(const at::Tensor& residual, const at::Tensor& x, const OptTensor& index,
                     const OptTensor& basis, const OptTensor& target, const OptTensor& gain, const OptTensor& vec,
                     const OptTensor& alpha, const OptTensor& scale, const OptTensor& shift,
                     const OptTensor& cond_dir, const OptTensor& cond_threshold, const OptTensor& preserve_norm) {
  // any leading shape: a patched layer passes its [B, S, d] streams as they are
  TORCH_CHECK(residual.dim() >= 1 && residual.is_contiguous(), "residual: expected a contiguous tensor, got shape ",
              residual.sizes());
  const int64_t d = residual.size(-1);
  SteerJob job = steer_job(residual.view({-1, d}), "residual", index, basis, target, gain, vec, alpha, scale, shift,
                           cond_dir, cond_threshold, preserve_norm);
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type() && x.is_contiguous() &&
                  x.device().is_cpu(),
              "x: expected a contiguous CPU ", residual.scalar_type(), " tensor of shape ", residual.sizes(),
              " (that of residual), got ", x.scalar_type(), " of shape ", x.sizes());
  at::Tensor out = at::empty_like(residual);
  job.h = x.data_ptr();
  job.residual = residual.data_ptr();
  job.out = out.data_ptr();
  const Kernels& kern = kernels();
  for_rows(residual.numel() / std::max<int64_t>(d, 1), d, [&](int64_t r0, int64_t r1) { kern.steer_rows(job, r0, r1); });
  return out;
}

}  // namespace cpu
}  // namespace steerkern
