// Host-side launchers of the CUDA kernels, declared in plain C++ (no torch or CUDA
// headers): cuda/binding.cpp, compiled against torch's CUDA headers, calls them with raw
// pointers, sizes and its current stream as void*; the .cu files compile with nvcc alone,
// so CI checks them even where torch has no CUDA (tests/test_cuda_sources.py).
#pragma once

#include <cstdint>

#include "../include/row_layout.h"

namespace scaleforge {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// y (rows, cols) in out_dtype = weight's dtype; x in x_dtype; out_dtype is x_dtype or fp32.
void launch_rms_norm(const void* x, const void* weight, void* y, int64_t rows, int64_t cols,
                     double eps, DType x_dtype, DType out_dtype, void* stream);

// grad_x (rows, cols) in x_dtype; inverse_rms (rows,) scratch and weight_partials
// (row_blocks, cols) in fp32 (fp64 for fp64 x): per block of rows, the sum of
// grad_y * rounded(x / rms) (the caller sums the blocks).
void launch_rms_norm_backward(const void* grad_y, const void* x, const void* weight,
                              void* grad_x, void* inverse_rms, void* weight_partials,
                              int64_t rows, int64_t cols, int64_t row_blocks, double eps,
                              DType x_dtype, DType out_dtype, void* stream);

// q and k rotated in one launch; cos and sin (T, head_dim) in fp32 (fp64 for fp64 q).
void launch_rope(const void* q, void* q_out, const RowLayout& q_layout, int64_t q_rows,
                 const void* k, void* k_out, const RowLayout& k_layout, int64_t k_rows,
                 const void* cos, const void* sin, int64_t head_dim, bool inverse, DType dtype,
                 void* stream);

void launch_swiglu(const void* gate, const void* up, void* y, int64_t numel, DType dtype,
                   void* stream);
void launch_swiglu_backward(const void* grad_y, const void* gate, const void* up,
                            void* grad_gate, void* grad_up, int64_t numel, DType dtype,
                            void* stream);

// The row kernel of linear_cross_entropy (ops.h, cross_entropy_rows_cpu's contract):
// logits (rows, vocab) fp32 or fp64; scale null for forward (writes losses), else a device
// scalar (overwrites the logits with their gradient).
void launch_cross_entropy_rows(void* logits, const int64_t* targets, int64_t rows,
                               int64_t vocab, int64_t ignore_index, void* losses,
                               const void* scale, bool fp64, void* stream);

}  // namespace cuda
}  // namespace scaleforge
