// ATen entry points of the scaleforge operators (schemas in registration.cpp).
//
// The CPU functions here are the CPU implementations; linear_cross_entropy is written once
// over ATen matrix products for every device and calls the device's row kernel
// (cross_entropy_rows_cpu here, cuda/binding.cpp for CUDA) on each chunk of logits.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "include/row_layout.h"

namespace scaleforge {

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, double eps);

std::tuple<at::Tensor, at::Tensor> rope_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin);
std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
    const at::Tensor& sin);

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& gate, const at::Tensor& up);

// Cross-entropy over the rows of a chunk of logits (rows, V) in fp32 or fp64, in place.
// Forward (scale undefined): writes each row's loss, logsumexp - logit[target], into
// `losses` (rows,), 0 where the target is ignore_index. Backward (scale a 0-dim tensor,
// d(loss)/d(row loss)): overwrites the logits with (softmax - onehot(target)) * scale,
// zero rows where the target is ignore_index; `losses` is not touched.
void cross_entropy_rows_cpu(
    at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, at::Tensor& losses,
    const c10::optional<at::Tensor>& scale);

at::Tensor linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    int64_t ignore_index, int64_t chunk_tokens);
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, int64_t ignore_index, int64_t chunk_tokens);

#ifdef SCALEFORGE_WITH_CUDA
// The CUDA row kernel, same contract (cuda/binding.cpp).
void cross_entropy_rows_cuda(
    at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, at::Tensor& losses,
    const c10::optional<at::Tensor>& scale);
#endif

// The row layout of `in` and `out` (..., T, D), whose last dimension is contiguous.
RowLayout row_layout(const at::Tensor& in, const at::Tensor& out);

// Checks shared by the CPU and CUDA implementations.
void check_rms_norm_inputs(const at::Tensor& x, const at::Tensor& weight);
void check_rope_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin);
void check_swiglu_inputs(const at::Tensor& gate, const at::Tensor& up);

// The dtype arithmetic runs in: fp64 for fp64 inputs, fp32 for the others.
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace scaleforge
