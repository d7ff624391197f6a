// The CUDA implementations of the scaleforge operators: input checks and allocation with
// ATen, then the .cu launchers (launchers.h) on the current stream. Compiled only when
// torch has CUDA (extension.py); the row layout, dtype promotion and blocking follow the
// CPU files, so both devices give the same results up to summation order.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "launchers.h"

namespace scaleforge {

namespace {

cuda::DType kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kDouble: return cuda::DType::kFloat64;
    default: TORCH_CHECK(false, "scaleforge CUDA kernels take fp32, fp16, bf16 or fp64, not ",
                         dtype);
  }
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::ScalarType checked_rms_norm_dtype(const at::Tensor& x, const at::Tensor& weight) {
  check_rms_norm_inputs(x, weight);
  const auto out_dtype = at::result_type(x, weight);
  TORCH_CHECK(out_dtype == x.scalar_type() || out_dtype == at::kFloat, "rms_norm: x ",
              x.scalar_type(), " with a weight that promotes it to ", out_dtype,
              " is not supported");
  return out_dtype;
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto out_dtype = checked_rms_norm_dtype(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x_c = x.contiguous();
  const auto w = weight.to(out_dtype).contiguous();
  auto y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  cuda::launch_rms_norm(x_c.data_ptr(), w.data_ptr(), y.data_ptr(), rows, cols, eps,
                        kernel_dtype(x.scalar_type()), kernel_dtype(out_dtype),
                        current_stream());
  return y;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto out_dtype = checked_rms_norm_dtype(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto x_c = x.contiguous();
  const auto g = grad_y.to(out_dtype).contiguous();
  const auto w = weight.to(out_dtype).contiguous();
  auto grad_x = at::empty(x.sizes(), x.options());
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  const auto acc = x.options().dtype(compute_dtype(x.scalar_type()));
  const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>(rows, 256));
  auto inverse_rms = at::empty({rows}, acc);
  auto partials = at::zeros({row_blocks, cols}, acc);
  cuda::launch_rms_norm_backward(g.data_ptr(), x_c.data_ptr(), w.data_ptr(), grad_x.data_ptr(),
                                 inverse_rms.data_ptr(), partials.data_ptr(), rows, cols,
                                 row_blocks, eps, kernel_dtype(x.scalar_type()),
                                 kernel_dtype(out_dtype), current_stream());
  return {grad_x, partials.sum(0).to(weight.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> rotate_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                               const at::Tensor& cos, const at::Tensor& sin,
                                               bool inverse) {
  check_rope_inputs(q_in, k_in, cos, sin);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = q_in.stride(-1) == 1 ? q_in : q_in.contiguous();
  const auto k = k_in.stride(-1) == 1 ? k_in : k_in.contiguous();
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  const auto acc = compute_dtype(q.scalar_type());
  const auto c = cos.to(acc).contiguous(), s = sin.to(acc).contiguous();
  const int64_t D = q.size(-1);
  cuda::launch_rope(q.data_ptr(), q_out.data_ptr(), row_layout(q, q_out),
                    q.numel() / std::max<int64_t>(D, 1), k.data_ptr(), k_out.data_ptr(),
                    row_layout(k, k_out), k.numel() / std::max<int64_t>(D, 1), c.data_ptr(),
                    s.data_ptr(), D, inverse, kernel_dtype(q.scalar_type()), current_stream());
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  return rotate_cuda(q, k, cos, sin, /*inverse=*/false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cuda(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
    const at::Tensor& sin) {
  return rotate_cuda(grad_q, grad_k, cos, sin, /*inverse=*/true);
}

at::Tensor swiglu_cuda(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu_inputs(gate_in, up_in);
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const auto gate = gate_in.contiguous(), up = up_in.contiguous();
  auto y = at::empty(gate.sizes(), gate.options());
  cuda::launch_swiglu(gate.data_ptr(), up.data_ptr(), y.data_ptr(), gate.numel(),
                      kernel_dtype(gate.scalar_type()), current_stream());
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu_inputs(gate_in, up_in);
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const auto gate = gate_in.contiguous(), up = up_in.contiguous();
  const auto grad = grad_in.to(gate.scalar_type()).contiguous();
  auto grad_gate = at::empty(gate.sizes(), gate.options());
  auto grad_up = at::empty(gate.sizes(), gate.options());
  cuda::launch_swiglu_backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(),
                               grad_gate.data_ptr(), grad_up.data_ptr(), gate.numel(),
                               kernel_dtype(gate.scalar_type()), current_stream());
  return {grad_gate, grad_up};
}

}  // namespace

void cross_entropy_rows_cuda(
    at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, at::Tensor& losses,
    const c10::optional<at::Tensor>& scale) {
  const c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(logits.is_contiguous() && targets.is_contiguous(),
              "cross_entropy_rows: logits and targets must be contiguous");
  cuda::launch_cross_entropy_rows(logits.data_ptr(), targets.data_ptr<int64_t>(),
                                  logits.size(0), logits.size(1), ignore_index,
                                  scale ? nullptr : losses.data_ptr(),
                                  scale ? scale->data_ptr() : nullptr,
                                  logits.scalar_type() == at::kDouble, current_stream());
}

}  // namespace scaleforge

TORCH_LIBRARY_IMPL(scaleforge, CUDA, m) {
  m.impl("rms_norm", &scaleforge::rms_norm_cuda);
  m.impl("rms_norm_backward", &scaleforge::rms_norm_backward_cuda);
  m.impl("rope", &scaleforge::rope_cuda);
  m.impl("rope_backward", &scaleforge::rope_backward_cuda);
  m.impl("swiglu", &scaleforge::swiglu_cuda);
  m.impl("swiglu_backward", &scaleforge::swiglu_backward_cuda);
  m.impl("linear_cross_entropy", &scaleforge::linear_cross_entropy);
  m.impl("linear_cross_entropy_backward", &scaleforge::linear_cross_entropy_backward);
}
