// SwiGLU's gate on the CPU: y = silu(gate) * up, elementwise, in fp32 (fp64 for fp64
// input) with one rounding to the input dtype.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "../ops.h"

namespace scaleforge {

void check_swiglu_inputs(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "swiglu: gate ", gate.sizes(), " and up ",
              up.sizes(), " differ in shape");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "swiglu: gate is ", gate.scalar_type(),
              ", up is ", up.scalar_type());
  TORCH_CHECK(at::isFloatingType(gate.scalar_type()), "swiglu: inputs must be floating point");
  TORCH_CHECK(gate.device() == up.device(), "swiglu: gate and up on different devices");
}

at::Tensor swiglu_cpu(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu_inputs(gate_in, up_in);
  const auto gate = gate_in.contiguous(), up = up_in.contiguous();
  auto y = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = gate.data_ptr<scalar_t>();
    const scalar_t* u = up.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, gate.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t x = static_cast<acc_t>(g[i]);
        out[i] = static_cast<scalar_t>(x / (acc_t(1) + std::exp(-x)) * static_cast<acc_t>(u[i]));
      }
    });
  });
  return y;
}

// d/dgate = grad * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))),
// d/dup = grad * silu(gate).
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu_inputs(gate_in, up_in);
  const auto gate = gate_in.contiguous(), up = up_in.contiguous();
  const auto grad = grad_in.to(gate.scalar_type()).contiguous();
  auto grad_gate = at::empty(gate.sizes(), gate.options());
  auto grad_up = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = gate.data_ptr<scalar_t>();
    const scalar_t* u = up.data_ptr<scalar_t>();
    const scalar_t* dy = grad.data_ptr<scalar_t>();
    scalar_t* dg = grad_gate.data_ptr<scalar_t>();
    scalar_t* du = grad_up.data_ptr<scalar_t>();
    at::parallel_for(0, gate.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t x = static_cast<acc_t>(g[i]), d = static_cast<acc_t>(dy[i]);
        const acc_t sigmoid = acc_t(1) / (acc_t(1) + std::exp(-x));
        dg[i] = static_cast<scalar_t>(
            d * static_cast<acc_t>(u[i]) * sigmoid * (acc_t(1) + x * (acc_t(1) - sigmoid)));
        du[i] = static_cast<scalar_t>(d * x * sigmoid);
      }
    });
  });
  return {grad_gate, grad_up};
}

}  // namespace scaleforge
