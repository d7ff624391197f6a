// Rotary embedding on the CPU, rotate-halves layout (models/rope.py): channel i of a head
// pairs with channel i + D/2, out1 = x1 cos1 - x2 sin1, out2 = x2 cos2 + x1 sin2. Queries
// and keys go through one parallel loop; the backward is the inverse rotation.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../include/row_layout.h"
#include "../ops.h"

namespace scaleforge {

void check_rope_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() >= 2 && q.dim() <= kMaxRowDims + 1 && k.dim() >= 2 &&
                  k.dim() <= kMaxRowDims + 1,
              "rope: q and k must be (..., T, head_dim) with at most ", kMaxRowDims + 1,
              " dimensions, got ", q.sizes(), " and ", k.sizes());
  const int64_t T = q.size(-2), D = q.size(-1);
  TORCH_CHECK(D % 2 == 0, "rope: head_dim ", D, " must be even");
  TORCH_CHECK(k.size(-2) == T && k.size(-1) == D, "rope: k ", k.sizes(),
              " does not match q's (T, head_dim) = (", T, ", ", D, ")");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "rope: cos and sin must be (T, head_dim) = (", T, ", ", D, "), got ", cos.sizes(),
              " and ", sin.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rope: q is ", q.scalar_type(), ", k is ",
              k.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()) && at::isFloatingType(cos.scalar_type()) &&
                  at::isFloatingType(sin.scalar_type()),
              "rope: q, k, cos and sin must be floating point");
  TORCH_CHECK(q.device() == k.device() && q.device() == cos.device() &&
                  q.device() == sin.device(),
              "rope: q, k, cos and sin on different devices");
}

RowLayout row_layout(const at::Tensor& in, const at::Tensor& out) {
  RowLayout layout{};
  layout.ndim = static_cast<int>(in.dim()) - 1;
  for (int dim = 0; dim < layout.ndim; ++dim) {
    layout.sizes[dim] = in.size(dim);
    layout.in_strides[dim] = in.stride(dim);
    layout.out_strides[dim] = out.stride(dim);
  }
  return layout;
}

namespace {

template <typename scalar_t>
void rotate_rows(const scalar_t* in, scalar_t* out, const RowLayout& layout, int64_t rows,
                 int64_t row_begin, int64_t row_end, int64_t D,
                 const at::opmath_type<scalar_t>* cos, const at::opmath_type<scalar_t>* sin,
                 bool inverse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = D / 2;
  for (int64_t r = row_begin; r < row_end; ++r) {
    int64_t in_offset, out_offset, t;
    layout.locate(r, &in_offset, &out_offset, &t);
    const acc_t* c = cos + t * D;
    const acc_t* s = sin + t * D;
    for (int64_t i = 0; i < half; ++i) {
      const acc_t x1 = static_cast<acc_t>(in[in_offset + i]);
      const acc_t x2 = static_cast<acc_t>(in[in_offset + i + half]);
      // Forward rotates by +angle; the gradient is rotated back (the transpose).
      const acc_t y1 = inverse ? x1 * c[i] + x2 * s[i + half] : x1 * c[i] - x2 * s[i];
      const acc_t y2 = inverse ? x2 * c[i + half] - x1 * s[i] : x2 * c[i + half] + x1 * s[i + half];
      out[out_offset + i] = static_cast<scalar_t>(y1);
      out[out_offset + i + half] = static_cast<scalar_t>(y2);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> rotate(const at::Tensor& q_in, const at::Tensor& k_in,
                                          const at::Tensor& cos, const at::Tensor& sin,
                                          bool inverse) {
  check_rope_inputs(q_in, k_in, cos, sin);
  const auto q = q_in.stride(-1) == 1 ? q_in : q_in.contiguous();
  const auto k = k_in.stride(-1) == 1 ? k_in : k_in.contiguous();
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  const auto acc = compute_dtype(q.scalar_type());
  const auto c = cos.to(acc).contiguous(), s = sin.to(acc).contiguous();
  const int64_t D = q.size(-1);
  const int64_t q_rows = q.numel() / std::max<int64_t>(D, 1);
  const int64_t k_rows = k.numel() / std::max<int64_t>(D, 1);
  const RowLayout q_layout = row_layout(q, q_out), k_layout = row_layout(k, k_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* c_data = c.data_ptr<acc_t>();
    const acc_t* s_data = s.data_ptr<acc_t>();
    // Rows [0, q_rows) are q's, the rest k's: one loop for both.
    at::parallel_for(0, q_rows + k_rows, 64, [&](int64_t begin, int64_t end) {
      if (begin < q_rows) {
        rotate_rows(q.data_ptr<scalar_t>(), q_out.data_ptr<scalar_t>(), q_layout, q_rows,
                    begin, std::min(end, q_rows), D, c_data, s_data, inverse);
      }
      if (end > q_rows) {
        rotate_rows(k.data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(), k_layout, k_rows,
                    std::max(begin, q_rows) - q_rows, end - q_rows, D, c_data, s_data, inverse);
      }
    });
  });
  return {q_out, k_out};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  return rotate(q, k, cos, sin, /*inverse=*/false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
    const at::Tensor& sin) {
  return rotate(grad_q, grad_k, cos, sin, /*inverse=*/true);
}

}  // namespace scaleforge
