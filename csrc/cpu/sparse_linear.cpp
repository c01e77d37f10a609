// sparse_linear and steer_sparse_linear: y = W (m * x) + bias with the
// norm-aware mask m = sparse_mask(x, scale, threshold, topk) of each row.
//
// Layout: weight_t is W^T [in, out], contiguous, so an inactive input i skips
// row i of it: a read of nact * out weights instead of in * out.
// * batch <= 8 (decode): the rows' active sets are merged; each active row of
//   W^T is read once and applied to every batch row with that row's own
//   coefficient (0 where the row drops the input), so every row keeps its own
//   exact mask.  The output columns are split over threads (isa_impl.h:
//   sparse_cols).  Batches of 9-63 rows go through it in groups of 8.
// * batch >= 64 (prefill): the union of active inputs is nearly all of them,
//   so the masked rows go through one dense fp32 GEMM (bf16/fp16 weights are
//   widened to fp32 per call, which the GEMM amortizes at that batch).
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "ops.h"

namespace steerkern {
namespace cpu {
namespace {

constexpr int64_t kMaxSmallBatch = 8;
// From this batch on, one dense GEMM (bf16/fp16 weights widened to fp32 per
// call); below it, groups of 8 rows through the sparse kernel cost less
// (measured at 4096 x 11008: equal at 64 rows, 2x faster at 9-16 rows).
constexpr int64_t kMinGemmBatch = 64;
constexpr int64_t kColumnBlock = 64;  // thread split granularity (whole cache lines)
// Split the inputs (see input_chunks) when a thread's column slice of a W^T
// row would be shorter than this, the weight is at least this large, and
// each range keeps at least this many inputs.
constexpr int64_t kMinRunBytes = 16384;
constexpr int64_t kMinSplitWeightBytes = 1 << 20;
constexpr int64_t kMinChunkRows = 256;

struct SparseArgs {
  int64_t in = 0, out = 0;
  at::Tensor weight_t;
  DType wdt = DType::F32;
  at::Tensor bias, scale;  // fp32 copies when given in another dtype
  float threshold = 0.f;
  int64_t topk = -1;
};

at::Tensor as_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

SparseArgs check_sparse(int64_t in, const at::Tensor& weight_t, const OptTensor& bias, const OptTensor& scale,
                        const char* scale_name, const at::Tensor& threshold, int64_t topk) {
  SparseArgs a;
  TORCH_CHECK(weight_t.device().is_cpu(), "weight_t: expected a CPU tensor, got one on ", weight_t.device());
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.size(0) == in, "weight_t: expected shape [", in,
              ", out] (W^T, in = x.shape[-1]), got ", weight_t.sizes());
  TORCH_CHECK(weight_t.is_contiguous(), "weight_t: expected a contiguous [in, out] tensor");
  a.weight_t = weight_t;
  a.wdt = float_dtype(weight_t, "weight_t");
  a.in = in;
  a.out = weight_t.size(1);
  if (bias.has_value()) {
    check_vector(*bias, a.out, "bias");
    a.bias = as_f32(*bias);
  }
  if (scale.has_value()) {
    check_vector(*scale, in, scale_name);
    a.scale = as_f32(*scale);
  }
  TORCH_CHECK(threshold.device().is_cpu(), "threshold: expected a CPU tensor, got one on ", threshold.device());
  TORCH_CHECK(threshold.numel() == 1 && threshold.is_floating_point(),
              "threshold: expected a floating-point scalar tensor, got ", threshold.scalar_type(), " of shape ",
              threshold.sizes());
  a.threshold = threshold.scalar_type() == at::kFloat ? *threshold.data_ptr<float>()
                                                      : threshold.to(at::kFloat).item<float>();
  a.topk = topk;
  return a;
}

// A total order key of an fp32 score: larger key = larger score, every NaN
// above +inf (all NaNs equal), -0 == +0.
inline uint32_t order_key(float s) {
  if (std::isnan(s)) return 0xFFFFFFFFu;
  const uint32_t u = f32_to_bits(s + 0.0f);  // -0 + 0 = +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Make v hold at least n elements (grows, never shrinks: a per-call buffer
// kept per thread costs no allocation once warm).
template <class T>
void grow(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
}

// flag[i] = 1 for the k largest scores; ties keep the lower index, NaN ranks
// highest: the stable descending sort of reference.sparse_mask.  Radix
// selection of the k-th largest key (11 + 11 + 10 bits), then one ordered scan.
void topk_flags(const float* score, int64_t n, int64_t k, uint8_t* flag) {
  if (k <= 0 || n == 0) {
    std::fill(flag, flag + n, uint8_t(0));
    return;
  }
  if (k >= n) {
    std::fill(flag, flag + n, uint8_t(1));
    return;
  }
  // per thread, reused: this runs once per row per call
  thread_local std::vector<uint32_t> keys, cand;
  grow(keys, n);
  grow(cand, n);
  for (int64_t i = 0; i < n; ++i) keys[i] = order_key(score[i]);
  const uint32_t* src = keys.data();
  int64_t count = n;
  int64_t need = k;  // how many of the remaining candidates to keep
  uint32_t prefix = 0;
  const int shifts[3] = {21, 10, 0};
  const int widths[3] = {11, 11, 10};
  for (int p = 0; p < 3; ++p) {
    const uint32_t mask = (1u << widths[p]) - 1u;
    int64_t hist[2048] = {0};
    for (int64_t i = 0; i < count; ++i) ++hist[(src[i] >> shifts[p]) & mask];
    uint32_t digit = mask;
    for (;; --digit) {
      if (hist[digit] >= need) break;
      need -= hist[digit];
    }
    prefix |= digit << shifts[p];
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i) {
      cand[kept] = src[i];
      kept += ((src[i] >> shifts[p]) & mask) == digit;
    }
    src = cand.data();
    count = kept;
  }
  // prefix is the k-th largest key; keep everything above it and the first
  // `need` keys equal to it
  int64_t ties = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool eq = keys[i] == prefix;
    flag[i] = uint8_t((keys[i] > prefix) | (eq & (ties < need)));
    ties += eq;
  }
}

// flag[i] = input i of this row stays active (reference.sparse_mask).
void mask_row(const float* score, int64_t n, const SparseArgs& a, uint8_t* flag) {
  if (a.topk >= 0) {
    topk_flags(score, n, a.topk, flag);
    return;
  }
  const float t = a.threshold;
  for (int64_t i = 0; i < n; ++i) flag[i] = !(score[i] <= t);  // NaN stays active
}

const float* opt_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// How many ranges of input rows a small batch is split over (1: split the
// columns instead).  Threads that split the columns each read a slice of
// every active row of W^T; when that slice is short (a narrow layer, or many
// threads), DRAM streams it badly, so each thread takes whole rows of its
// own input range and the partial sums are added after.  Measured over a
// decode-like sequence of TinyLlama projections, 2 threads: 6-12% faster in
// bf16 and fp32, sparse and dense, than splitting the columns.
//
// The choice depends on the layer's shape and the thread count only, never on
// which inputs are active or on the batch size, so a row's sums are added in
// the same order alone as in any batch: a batched row equals the row alone,
// bit for bit.
int64_t input_chunks(int64_t in, int64_t row_bytes) {
  const int64_t nt = at::get_num_threads();
  if (nt < 2 || at::in_parallel_region() || row_bytes >= nt * kMinRunBytes) return 1;
  if (in * row_bytes < kMinSplitWeightBytes) return 1;  // too little to pay for the threads
  return std::max<int64_t>(1, std::min(nt, in / kMinChunkRows));
}

// The split itself: range c is inputs [c * in / chunks, (c + 1) * in / chunks).
// One part's active input rows and coefficients for a batch of B <= 8 rows
// (every row's own mask; the union of the rows' active inputs is streamed).
struct Prepared {
  std::vector<float> xf, score, coef;
  std::vector<uint8_t> flags;
  std::vector<int32_t> idx;
  SparseJob job;
};

void prepare(const at::Tensor& x, const SparseArgs& a, at::Tensor& y, Prepared& p) {
  const Kernels& kern = kernels();
  const int64_t B = x.size(0), in = a.in;
  const DType xdt = float_dtype(x, "x");
  const int64_t xs = dtype_size(xdt);
  grow(p.xf, B * in);
  grow(p.score, in);
  grow(p.flags, B * in);
  grow(p.idx, in);
  for (int64_t b = 0; b < B; ++b) {
    kern.scores(static_cast<const char*>(x.data_ptr()) + b * in * xs, xdt, opt_ptr(a.scale), in,
                p.xf.data() + b * in, p.score.data());
    mask_row(p.score.data(), in, a, p.flags.data() + b * in);
  }
  int64_t nact = 0;
  for (int64_t i = 0; i < in; ++i) {
    uint8_t any = 0;
    for (int64_t b = 0; b < B; ++b) any |= p.flags[b * in + i];
    p.idx[nact] = int32_t(i);
    nact += any;
  }
  grow(p.coef, B * nact);
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = p.xf.data() + b * in;
    const uint8_t* fb = p.flags.data() + b * in;
    for (int64_t j = 0; j < nact; ++j) p.coef[b * nact + j] = fb[p.idx[j]] ? xb[p.idx[j]] : 0.0f;
  }
  SparseJob& job = p.job;
  job = SparseJob();
  job.B = B;
  job.nact = nact;
  job.idx = p.idx.data();
  job.coef = p.coef.data();
  job.coef_ld = nact;
  job.wt = a.weight_t.data_ptr();
  job.wdt = a.wdt;
  job.out = a.out;
  job.bias = opt_ptr(a.bias);
  job.y = y.data_ptr();
  job.ydt = xdt;
  job.coef_bf16 = xdt == DType::BF16;  // coef holds values of x (or 0)
}

// Parts (sibling projections of the same x, or one layer alone) split over
// input ranges, all in one parallel region: range c of every part goes to
// the same thread, into fp32 partial sums that are added afterwards.
void split_inputs(const std::vector<Prepared*>& parts, int64_t chunks, int64_t in, std::vector<at::Tensor*>& ys) {
  const Kernels& kern = kernels();
  const int64_t P = int64_t(parts.size());
  std::vector<int64_t> first(P * (chunks + 1));  // per part, the first position in idx of each range
  std::vector<int64_t> offset(P + 1, 0);         // per part, where its [chunks, B, out] partial sums start
  for (int64_t p = 0; p < P; ++p) {
    const SparseJob& job = parts[p]->job;
    for (int64_t c = 0, j = 0; c <= chunks; ++c) {
      const int64_t lo = c * in / chunks;
      while (j < job.nact && job.idx[j] < lo) ++j;
      first[p * (chunks + 1) + c] = c == chunks ? job.nact : j;
    }
    offset[p + 1] = offset[p] + chunks * job.B * job.out;
  }
  float* partial = scratch(offset[P], 4);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t p = 0; p < P; ++p) {
        const SparseJob& job = parts[p]->job;
        const int64_t* f = first.data() + p * (chunks + 1);
        SparseJob part = job;
        part.idx = job.idx + f[c];
        part.coef = job.coef + f[c];  // coef_ld stays the whole job's nact
        part.nact = f[c + 1] - f[c];
        part.bias = nullptr;
        part.y = partial + offset[p] + c * job.B * job.out;
        part.ydt = DType::F32;
        kern.sparse_cols(part, 0, job.out);
      }
    }
  });
  for (int64_t p = 0; p < P; ++p) {
    const SparseJob& job = parts[p]->job;
    const int64_t n = job.B * job.out;
    float* sum = partial + offset[p];
    for (int64_t c = 1; c < chunks; ++c) {
      const float* q = sum + c * n;
      for (int64_t i = 0; i < n; ++i) sum[i] += q[i];
    }
    if (job.bias) {
      for (int64_t b = 0; b < job.B; ++b)
        for (int64_t i = 0; i < job.out; ++i) sum[b * job.out + i] += job.bias[i];
    }
    ys[p]->copy_(at::from_blob(sum, {job.B, job.out}, at::TensorOptions().dtype(at::kFloat)));
  }
}

// One prepared part split over output columns.
void split_columns(const SparseJob& job) {
  const Kernels& kern = kernels();
  const int64_t blocks = (job.out + kColumnBlock - 1) / kColumnBlock;
  const int64_t work_per_block = std::max<int64_t>(1, job.B * job.nact * kColumnBlock);
  const int64_t grain = std::max<int64_t>(1, 65536 / work_per_block);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    kern.sparse_cols(job, b0 * kColumnBlock, std::min(b1 * kColumnBlock, job.out));
  });
}

void small_batch(const at::Tensor& x, const SparseArgs& a, at::Tensor& y) {
  thread_local Prepared prep;
  prepare(x, a, y, prep);
  const int64_t chunks = input_chunks(a.in, a.out * dtype_size(a.wdt));
  if (chunks > 1) {
    std::vector<Prepared*> parts{&prep};
    std::vector<at::Tensor*> ys{&y};
    split_inputs(parts, chunks, a.in, ys);
    return;
  }
  split_columns(prep.job);
}

void large_batch(const at::Tensor& x, const SparseArgs& a, at::Tensor& y) {
  const Kernels& kern = kernels();
  const int64_t B = x.size(0), in = a.in;
  const DType xdt = float_dtype(x, "x");
  const int64_t xs = dtype_size(xdt);
  at::Tensor xm = at::empty({B, in}, x.options().dtype(at::kFloat));
  float* xmp = xm.data_ptr<float>();
  const char* xp = static_cast<const char*>(x.data_ptr());
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(in, 1)), [&](int64_t r0, int64_t r1) {
    float* score = scratch(in, 3);
    std::unique_ptr<uint8_t[]> flag(new uint8_t[in]);
    for (int64_t r = r0; r < r1; ++r) {
      float* row = xmp + r * in;
      kern.scores(xp + r * in * xs, xdt, opt_ptr(a.scale), in, row, score);
      mask_row(score, in, a, flag.get());
      for (int64_t i = 0; i < in; ++i) row[i] = flag[i] ? row[i] : 0.0f;
    }
  });
  at::Tensor acc = at::mm(xm, as_f32(a.weight_t));
  if (a.bias.defined()) acc.add_(a.bias);
  y.copy_(acc);
}

at::Tensor sparse_linear_checked(const at::Tensor& x, const SparseArgs& a) {
  at::Tensor y = at::empty({x.size(0), a.out}, x.options());
  if (x.size(0) == 0 || a.out == 0) return y;
  const int64_t B = x.size(0);
  if (B >= kMinGemmBatch) {
    large_batch(x, a, y);
    return y;
  }
  // groups of up to 8 rows, each one pass over its union of active rows
  if (B <= kMaxSmallBatch) {  // decode: no narrowed views to make
    small_batch(x, a, y);
    return y;
  }
  for (int64_t b0 = 0; b0 < B; b0 += kMaxSmallBatch) {
    const int64_t nb = std::min(kMaxSmallBatch, B - b0);
    at::Tensor yb = y.narrow(0, b0, nb);
    small_batch(x.narrow(0, b0, nb), a, yb);
  }
  return y;
}

}  // namespace

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight_t, const OptTensor& bias,
                         const OptTensor& scale, const at::Tensor& threshold, int64_t topk) {
  check_rows(x, "x");
  const SparseArgs a = check_sparse(x.size(1), weight_t, bias, scale, "scale", threshold, topk);
  return sparse_linear_checked(x, a);
}

std::vector<at::Tensor> sparse_linear_parts(const at::Tensor& x, const std::vector<at::Tensor>& weight_ts,
                                            const std::vector<OptTensor>& biases,
                                            const std::vector<OptTensor>& scales,
                                            const std::vector<at::Tensor>& thresholds) {
  // any leading shape: a patched projection passes its [B, S, in] input as it is
  TORCH_CHECK(x.dim() >= 1, "x: expected at least one dimension, got a scalar");
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.is_contiguous(), "x: expected a contiguous tensor");
  const int64_t P = int64_t(weight_ts.size());
  TORCH_CHECK(P >= 1 && int64_t(biases.size()) == P && int64_t(scales.size()) == P && int64_t(thresholds.size()) == P,
              "parts: expected as many biases, scales and thresholds as weights (", P, "), got ", biases.size(), ", ",
              scales.size(), " and ", thresholds.size());
  const int64_t in = x.size(-1);
  const at::Tensor x2 = x.view({-1, in});
  float_dtype(x2, "x");
  std::vector<SparseArgs> args;
  for (int64_t p = 0; p < P; ++p)  // every part is checked before any work is done
    args.push_back(check_sparse(in, weight_ts[p], biases[p], scales[p], "scale", thresholds[p], -1));
  std::vector<at::Tensor> ys;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  const int64_t B = x2.size(0);
  // siblings share one parallel region when the decode path splits each of
  // them over the same input ranges; otherwise each part runs on its own
  int64_t chunks = 0;
  if (B >= 1 && B <= kMaxSmallBatch && P > 1) {
    for (const SparseArgs& a : args) {
      const int64_t c = a.out > 0 ? input_chunks(in, a.out * dtype_size(a.wdt)) : 0;
      chunks = (chunks == 0 || chunks == c) ? c : -1;
    }
  }
  if (chunks > 1) {
    thread_local std::vector<Prepared> preps;
    if (int64_t(preps.size()) < P) preps.resize(size_t(P));
    std::vector<at::Tensor> flat;
    std::vector<Prepared*> parts;
    std::vector<at::Tensor*> outs;
    flat.reserve(size_t(P));
    for (int64_t p = 0; p < P; ++p) {
      flat.push_back(at::empty({B, args[p].out}, x.options()));
      prepare(x2, args[p], flat.back(), preps[p]);
      parts.push_back(&preps[p]);
    }
    for (auto& t : flat) outs.push_back(&t);
    split_inputs(parts, chunks, in, outs);
    for (int64_t p = 0; p < P; ++p) {
      shape.back() = args[p].out;
      ys.push_back(flat[p].view(shape));
    }
    return ys;
  }
  for (int64_t p = 0; p < P; ++p) {
    shape.back() = args[p].out;
    ys.push_back(sparse_linear_checked(x2, args[p]).view(shape));
  }
  return ys;
}

at::Tensor steer_sparse_linear(const at::Tensor& h, const OptTensor& index, const OptTensor& basis,
                               const OptTensor& target, const OptTensor& gain, const OptTensor& vec,
                               const OptTensor& alpha, const OptTensor& scale, const OptTensor& shift,
                               const OptTensor& cond_dir, const OptTensor& cond_threshold,
                               const OptTensor& preserve_norm, const at::Tensor& weight_t, const OptTensor& bias,
                               const OptTensor& col_scale, const at::Tensor& threshold, int64_t topk) {
  check_rows(h, "h");
  // every argument is checked before any work is done
  const SparseArgs a = check_sparse(h.size(1), weight_t, bias, col_scale, "col_scale", threshold, topk);
  // the steered rows are rounded to h's dtype, as if written out (the spec)
  const at::Tensor s = steer(h, index, basis, target, gain, vec, alpha, scale, shift, cond_dir, cond_threshold,
                             preserve_norm);
  return sparse_linear_checked(s, a);
}

}  // namespace cpu
}  // namespace steerkern
