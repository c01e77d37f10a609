// Host side of the cuda backend: argument checks, outputs from the torch
// allocator, the top-k mask and the dense fallback in ATen, and the pybind
// module steerkern._C_cuda with one function per op.  The kernel-level
// signatures are the torch.library schemas minus `backend` (2-D contiguous
// rows, index flattened int32 or None).  Nothing here waits for the device:
// every op can be captured in a CUDA graph.

#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "launchers.h"

namespace steerkern_cuda {
namespace {

// Above this many rows the masked dense matmul (cuBLAS) replaces the sparse
// GEMV: the union of the rows' active inputs approaches the whole weight.
// The default 8 is the largest decode batch the kernel is tuned for;
// bench/bench_ops_gpu.py measures the real crossover and can set it.
constexpr int64_t kDefaultDenseCrossover = 8;
int64_t g_dense_crossover = kDefaultDenseCrossover;

using OptTensor = std::optional<at::Tensor>;

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::F32;
}

void* current_stream(const at::Tensor& t) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device()).native_handle();
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_launch(const char* err, const char* what) {
  TORCH_CHECK(err == nullptr, what, ": CUDA launch failed: ", err ? err : "");
}

template <typename T>
const T* ptr_or_null(const OptTensor& t, c10::ScalarType want, const char* name) {
  if (!t.has_value()) return nullptr;
  check_cuda(*t, name);
  TORCH_CHECK(t->scalar_type() == want, name, ": expected ", want, ", got ", t->scalar_type());
  return static_cast<const T*>(t->data_ptr());
}

SteerTable table_of(const OptTensor& basis, const OptTensor& target, const OptTensor& gain,
                    const OptTensor& vec, const OptTensor& alpha, const OptTensor& scale,
                    const OptTensor& shift, const OptTensor& cond_dir, const OptTensor& cond_threshold,
                    const OptTensor& preserve_norm) {
  SteerTable t;
  t.basis = ptr_or_null<float>(basis, at::kFloat, "basis");
  t.target = ptr_or_null<float>(target, at::kFloat, "target");
  t.gain = ptr_or_null<float>(gain, at::kFloat, "gain");
  t.vec = ptr_or_null<float>(vec, at::kFloat, "vec");
  t.alpha = ptr_or_null<float>(alpha, at::kFloat, "alpha");
  t.scale = ptr_or_null<float>(scale, at::kFloat, "scale");
  t.shift = ptr_or_null<float>(shift, at::kFloat, "shift");
  t.cond_dir = ptr_or_null<float>(cond_dir, at::kFloat, "cond_dir");
  t.cond_threshold = ptr_or_null<float>(cond_threshold, at::kFloat, "cond_threshold");
  t.preserve_norm = ptr_or_null<uint8_t>(preserve_norm, at::kByte, "preserve_norm");
  TORCH_CHECK((t.basis == nullptr) == (t.target == nullptr) && (t.basis == nullptr) == (t.gain == nullptr),
              "basis, target and gain must be given together");
  TORCH_CHECK((t.vec == nullptr) == (t.alpha == nullptr), "vec and alpha must be given together");
  TORCH_CHECK((t.cond_dir == nullptr) == (t.cond_threshold == nullptr),
              "cond_dir and cond_threshold must be given together");
  for (const OptTensor* p : {&basis, &vec, &scale, &shift, &cond_dir, &preserve_norm, &alpha, &gain}) {
    if (p->has_value()) {
      t.K = static_cast<int>((*p)->size(0));
      break;
    }
  }
  t.k = basis.has_value() ? static_cast<int>(basis->size(1)) : 0;
  return t;
}

void run_steer(const at::Tensor& x, const OptTensor& residual, at::Tensor& r, at::Tensor* y,
               const at::Tensor* norm_weight, double eps, double weight_offset, const OptTensor& index,
               const SteerTable& table) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected shape [rows, d], got ", x.sizes());
  SteerRows a;
  a.x = x.data_ptr();
  a.dtype = dtype_of(x, "x");
  if (residual.has_value()) {
    check_cuda(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual: expected the shape and dtype of x");
    a.residual = residual->data_ptr();
  }
  a.r_out = r.data_ptr();
  if (y != nullptr) {
    check_cuda(*norm_weight, "weight");
    TORCH_CHECK(norm_weight->numel() == x.size(1), "weight: expected shape [", x.size(1), "]");
    a.y_out = y->data_ptr();
    a.norm_weight = norm_weight->data_ptr();
    a.norm_weight_dtype = dtype_of(*norm_weight, "weight");
  }
  if (index.has_value()) {
    a.index = ptr_or_null<int32_t>(index, at::kInt, "index");
    TORCH_CHECK(index->numel() == x.size(0), "index: expected shape [", x.size(0), "]");
  }
  a.rows = x.size(0);
  a.d = x.size(1);
  a.eps = static_cast<float>(eps);
  a.weight_offset = static_cast<float>(weight_offset);
  a.table = table;
  const c10::OptionalDeviceGuard guard(x.device());
  check_launch(launch_steer_rows(a, current_stream(x)), "steer");
}

at::Tensor sparse_mask(const at::Tensor& x, const OptTensor& scale, const at::Tensor& threshold, int64_t topk) {
  at::Tensor score = x.to(at::kFloat).abs();
  if (scale.has_value()) score = score * scale->to(at::kFloat);
  if (topk < 0) return at::logical_not(score <= threshold.to(at::kFloat));
  at::Tensor mask = at::zeros_like(score, score.options().dtype(at::kBool));
  if (topk > 0 && score.size(0) > 0) {
    // a stable descending sort ranks NaN first and keeps ties in index order
    at::Tensor order = std::get<1>(at::sort(score, /*stable=*/true, /*dim=*/-1, /*descending=*/true));
    mask.scatter_(-1, order.narrow(-1, 0, topk), true);
  }
  return mask;
}

}  // namespace

at::Tensor steer(const at::Tensor& h, const OptTensor& index, const OptTensor& basis, const OptTensor& target,
                 const OptTensor& gain, const OptTensor& vec, const OptTensor& alpha, const OptTensor& scale,
                 const OptTensor& shift, const OptTensor& cond_dir, const OptTensor& cond_threshold,
                 const OptTensor& preserve_norm) {
  const SteerTable table =
      table_of(basis, target, gain, vec, alpha, scale, shift, cond_dir, cond_threshold, preserve_norm);
  if (table.K == 0) return h.clone();
  at::Tensor out = at::empty_like(h);
  run_steer(h, std::nullopt, out, nullptr, nullptr, 0.0, 0.0, index, table);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_steer_rmsnorm(
    const at::Tensor& x, const OptTensor& residual, const at::Tensor& weight, double eps, double weight_offset,
    const OptTensor& index, const OptTensor& basis, const OptTensor& target, const OptTensor& gain,
    const OptTensor& vec, const OptTensor& alpha, const OptTensor& scale, const OptTensor& shift,
    const OptTensor& cond_dir, const OptTensor& cond_threshold, const OptTensor& preserve_norm) {
  const SteerTable table =
      table_of(basis, target, gain, vec, alpha, scale, shift, cond_dir, cond_threshold, preserve_norm);
  at::Tensor r = at::empty_like(x);
  at::Tensor y = at::empty_like(x);
  run_steer(x, residual, r, &y, &weight, eps, weight_offset, index, table);
  return {r, y};
}

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight_t, const OptTensor& bias,
                         const OptTensor& scale, const at::Tensor& threshold, int64_t topk) {
  check_cuda(x, "x");
  check_cuda(weight_t, "weight_t");
  TORCH_CHECK(x.dim() == 2 && weight_t.dim() == 2 && weight_t.size(0) == x.size(1),
              "weight_t: expected shape [", x.size(1), ", out], got ", weight_t.sizes());
  TORCH_CHECK(threshold.is_cuda() && threshold.numel() == 1 && threshold.scalar_type() == at::kFloat,
              "threshold: expected a 0-dim float32 CUDA tensor");
  const c10::OptionalDeviceGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int64_t n_out = weight_t.size(1);
  if (rows > g_dense_crossover && weight_t.scalar_type() == x.scalar_type()) {
    const at::Tensor xm = at::where(sparse_mask(x, scale, threshold, topk), x, at::zeros({}, x.options()));
    if (!bias.has_value()) return at::matmul(xm, weight_t);
    return at::addmm(bias->to(x.scalar_type()), xm, weight_t);
  }
  at::Tensor mask;
  if (topk >= 0) mask = sparse_mask(x, scale, threshold, topk).to(at::kByte).contiguous();
  // the workspace starts as a copy of the bias; every split of K adds its partial sum
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor ws = bias.has_value() ? at::empty({rows, n_out}, f32).copy_(*bias) : at::zeros({rows, n_out}, f32);
  SparseGemv a;
  a.x = x.data_ptr();
  a.x_dtype = dtype_of(x, "x");
  a.mask = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
  a.scale = ptr_or_null<float>(scale, at::kFloat, "scale");
  a.threshold = threshold.data_ptr<float>();
  a.weight_t = weight_t.data_ptr();
  a.w_dtype = dtype_of(weight_t, "weight_t");
  a.workspace = ws.data_ptr<float>();
  a.rows = rows;
  a.n_in = x.size(1);
  a.n_out = n_out;
  check_launch(launch_sparse_gemv(a, current_stream(x)), "sparse_linear");
  return ws.to(x.scalar_type());
}

}  // namespace steerkern_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "steerkern CUDA kernels (csrc/cuda)";
  m.def("set_dense_crossover", [](int64_t rows) { steerkern_cuda::g_dense_crossover = rows; },
        "rows above which sparse_linear runs the masked dense matmul");
  m.def("steer", &steerkern_cuda::steer);
  m.def("add_steer_rmsnorm", &steerkern_cuda::add_steer_rmsnorm);
  m.def("sparse_linear", &steerkern_cuda::sparse_linear);
}
