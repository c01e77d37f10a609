// Plain C++ interface between the torch host code (ops.cpp) and the CUDA
// kernels (*.cu).  The .cu files include no torch header, so they compile
// quickly and against any CUDA toolkit; ops.cpp includes no CUDA header.
#pragma once

#include <cstdint>

namespace steerkern_cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// One steering table (see steerkern/ops/reference.py); absent parts are null.
struct SteerTable {
  const float* basis = nullptr;      // [K, k, d]
  const float* target = nullptr;     // [K, k]
  const float* gain = nullptr;       // [K]
  const float* vec = nullptr;        // [K, d]
  const float* alpha = nullptr;      // [K]
  const float* scale = nullptr;      // [K, d]
  const float* shift = nullptr;      // [K, d]
  const float* cond_dir = nullptr;   // [K, d]
  const float* cond_threshold = nullptr;  // [K]
  const uint8_t* preserve_norm = nullptr; // [K]
  int K = 0;
  int k = 0;
};

struct SteerRows {
  const void* x = nullptr;         // [rows, d], dtype
  const void* residual = nullptr;  // [rows, d], dtype, or null
  void* r_out = nullptr;           // [rows, d], dtype
  void* y_out = nullptr;           // [rows, d], dtype, or null: no RMSNorm
  const void* norm_weight = nullptr;  // [d], norm_weight_dtype
  DType dtype = DType::F32;
  DType norm_weight_dtype = DType::F32;
  const int32_t* index = nullptr;  // [rows] or null: entry 1 everywhere
  int64_t rows = 0;
  int64_t d = 0;
  float eps = 0.f;
  float weight_offset = 0.f;
  SteerTable table;
};

struct SparseGemv {
  const void* x = nullptr;        // [rows, n_in], x_dtype
  DType x_dtype = DType::F32;
  const uint8_t* mask = nullptr;  // [rows, n_in] precomputed (top-k), or null: threshold
  const float* scale = nullptr;   // [n_in] WINA column norms, or null
  const float* threshold = nullptr;  // 0-dim device tensor, read in the kernel
  const void* weight_t = nullptr;    // [n_in, n_out], w_dtype
  DType w_dtype = DType::F32;
  float* workspace = nullptr;        // [rows, n_out] fp32, holds the bias on entry
  int64_t rows = 0;
  int64_t n_in = 0;
  int64_t n_out = 0;
};

// Each returns nullptr on success or the CUDA error string of the launch.
const char* launch_steer_rows(const SteerRows& args, void* stream);
const char* launch_sparse_gemv(const SparseGemv& args, void* stream);

}  // namespace steerkern_cuda
