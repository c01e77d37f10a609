// The pybind11 module: steerkern._C when built by setup.py, or the JIT name
// that torch.utils.cpp_extension.load gives it; TORCH_EXTENSION_NAME is both.
#include <torch/extension.h>

#include "ops.h"

namespace sk = steerkern::cpu;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "steerkern CPU kernels (see steerkern/ops/reference.py for the semantics)";
  m.def("steer", &sk::steer, "steer rows of h [rows, d] by the table");
  m.def("add_steer", &sk::add_steer, "steer(residual + x) in a new tensor, any leading shape");
  m.def("add_steer_rmsnorm", &sk::add_steer_rmsnorm, "fused residual add, steer and RMSNorm; returns (r, y)");
  m.def("steer_", &sk::steer_, "steer rows of h [rows, d] in place");
  m.def("add_steer_rmsnorm_", &sk::add_steer_rmsnorm_,
        "add_steer_rmsnorm in place: residual <- r, x <- y (vLLM's fused_add_rms_norm convention)");
  m.def("sparse_linear", &sk::sparse_linear, "norm-aware sparse activation fused with a linear layer");
  m.def("sparse_linear_parts", &sk::sparse_linear_parts,
        "sparse_linear of one x (any leading shape) through several weights; a list of outputs");
  m.def("steer_sparse_linear", &sk::steer_sparse_linear, "sparse_linear(steer(h)) in one call");
  m.def("decode_attention", &sk::decode_attention,
        "one decode step of attention (q [B, H, 1, D], k/v [B, KVH, L, D], no mask); returns [B, 1, H, D]");
  m.def("cpu_capability", [] { return std::string(sk::capability()); },
        "the instruction set the kernels use: avx512bf16, avx512, avx2+fma or portable");
  m.def(
      "set_capability",
      [](const std::string& name) {
        const char* now = sk::set_capability(name.c_str());
        TORCH_CHECK(now != nullptr, "set_capability: unknown name '", name,
                    "'; expected auto, avx512bf16, avx512, avx2+fma (or avx2) or portable");
        return std::string(now);
      },
      "cap the instruction set (for tests and comparisons); returns the one now in use");
}
