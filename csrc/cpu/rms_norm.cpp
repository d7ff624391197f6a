// RMSNorm on the CPU: y = weight * (x / rms(x)) over the last dimension, statistics in
// fp32 (fp64 for fp64 input). The normalised x is rounded to x's dtype before the weight
// multiplies, in the dtype x and weight promote to: the arithmetic of models/transformer.py's
// RMSNorm, so the results agree to the last rounding of the sum of squares.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "../ops.h"

namespace scaleforge {

void check_rms_norm_inputs(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x needs at least one dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be (", x.size(-1), ",), got ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && at::isFloatingType(weight.scalar_type()),
              "rms_norm: x and weight must be floating point");
  TORCH_CHECK(x.device() == weight.device(), "rms_norm: x and weight on different devices");
}

namespace {

// One row's 1 / sqrt(mean(x^2) + eps) in acc_t.
template <typename x_t, typename acc_t>
acc_t inverse_rms(const x_t* row, int64_t cols, double eps) {
  acc_t sum_squares = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const acc_t v = static_cast<acc_t>(row[c]);
    sum_squares += v * v;
  }
  return acc_t(1) / std::sqrt(sum_squares / static_cast<acc_t>(cols) + static_cast<acc_t>(eps));
}

template <typename x_t, typename out_t>
void forward_rows(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, double eps) {
  using acc_t = at::opmath_type<x_t>;
  using out_acc_t = at::opmath_type<out_t>;
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  const x_t* x_data = x.data_ptr<x_t>();
  const out_t* w = weight.data_ptr<out_t>();
  out_t* y_data = y.data_ptr<out_t>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const x_t* row = x_data + r * cols;
      const acc_t scale = inverse_rms<x_t, acc_t>(row, cols, eps);
      for (int64_t c = 0; c < cols; ++c) {
        const x_t normed = static_cast<x_t>(static_cast<acc_t>(row[c]) * scale);
        y_data[r * cols + c] = static_cast<out_t>(
            static_cast<out_acc_t>(static_cast<out_t>(normed)) * static_cast<out_acc_t>(w[c]));
      }
    }
  });
}

// grad_x = s * (g - xhat * mean(g * xhat)) with g = grad_y * weight, xhat = x * s;
// grad_weight = sum over rows of grad_y * xhat (xhat rounded as in forward), reduced per
// block of rows into `partials` (blocks, cols), then summed in a fixed order.
template <typename x_t, typename out_t>
void backward_rows(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                   double eps, at::Tensor& grad_x, at::Tensor& partials) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  const int64_t blocks = partials.size(0);
  const x_t* x_data = x.data_ptr<x_t>();
  const out_t* g_data = grad_y.data_ptr<out_t>();
  const out_t* w = weight.data_ptr<out_t>();
  x_t* gx_data = grad_x.data_ptr<x_t>();
  acc_t* partial_data = partials.data_ptr<acc_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      acc_t* partial = partial_data + block * cols;
      for (int64_t r = block * rows / blocks; r < (block + 1) * rows / blocks; ++r) {
        const x_t* row = x_data + r * cols;
        const out_t* grad_row = g_data + r * cols;
        const acc_t scale = inverse_rms<x_t, acc_t>(row, cols, eps);
        acc_t dot = 0;
        for (int64_t c = 0; c < cols; ++c) {
          const acc_t xhat = static_cast<acc_t>(row[c]) * scale;
          const acc_t g = static_cast<acc_t>(grad_row[c]) * static_cast<acc_t>(w[c]);
          dot += g * xhat;
          partial[c] += static_cast<acc_t>(grad_row[c]) *
                        static_cast<acc_t>(static_cast<x_t>(xhat));
        }
        dot /= static_cast<acc_t>(cols);
        for (int64_t c = 0; c < cols; ++c) {
          const acc_t xhat = static_cast<acc_t>(row[c]) * scale;
          const acc_t g = static_cast<acc_t>(grad_row[c]) * static_cast<acc_t>(w[c]);
          gx_data[r * cols + c] = static_cast<x_t>(scale * (g - xhat * dot));
        }
      }
    }
  });
}

// x and weight promote to x's dtype, or to fp32 when x is reduced and weight fp32.
void check_promotion(at::ScalarType x_dtype, at::ScalarType out_dtype) {
  TORCH_CHECK(out_dtype == x_dtype || out_dtype == at::kFloat, "rms_norm: x ", x_dtype,
              " with a weight that promotes it to ", out_dtype, " is not supported");
}

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_inputs(x, weight);
  const auto out_dtype = at::result_type(x, weight);
  const auto x_c = x.contiguous();
  const auto w = weight.to(out_dtype).contiguous();
  auto y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  check_promotion(x.scalar_type(), out_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    if (out_dtype == x.scalar_type()) {
      forward_rows<scalar_t, scalar_t>(x_c, w, y, eps);
    } else {
      forward_rows<scalar_t, float>(x_c, w, y, eps);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_inputs(x, weight);
  const auto out_dtype = at::result_type(x, weight);
  const auto x_c = x.contiguous();
  const auto g = grad_y.to(out_dtype).contiguous();
  const auto w = weight.to(out_dtype).contiguous();
  auto grad_x = at::empty(x.sizes(), x.options());
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
  auto partials = at::zeros({blocks, cols}, x.options().dtype(compute_dtype(x.scalar_type())));
  check_promotion(x.scalar_type(), out_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_backward",
                                  [&] {
    if (out_dtype == x.scalar_type()) {
      backward_rows<scalar_t, scalar_t>(g, x_c, w, eps, grad_x, partials);
    } else {
      backward_rows<scalar_t, float>(g, x_c, w, eps, grad_x, partials);
    }
  });
  return {grad_x, partials.sum(0).to(weight.scalar_type())};
}

}  // namespace scaleforge
