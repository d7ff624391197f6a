// RMSNorm on CUDA: one block per row, statistics in fp32 (fp64), the arithmetic of
// cpu/rms_norm.cpp (the normalised x rounded to x's dtype before the weight multiplies).
#include "common.cuh"

namespace scaleforge {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename x_t, typename out_t>
__global__ void rms_norm_kernel(const x_t* __restrict__ x, const out_t* __restrict__ weight,
                                out_t* __restrict__ y, int64_t cols, double eps) {
  using A = typename Acc<x_t>::type;
  __shared__ A shared[32];
  const x_t* row = x + blockIdx.x * cols;
  A sum_squares = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const A v = load(row[c]);
    sum_squares += v * v;
  }
  sum_squares = block_reduce<A, false>(sum_squares, shared);
  const A scale = A(1) / sqrt(sum_squares / static_cast<A>(cols) + static_cast<A>(eps));
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const x_t normed = store<x_t>(load(row[c]) * scale);
    y[blockIdx.x * cols + c] = store<out_t>(load(store<out_t>(load(normed))) * load(weight[c]));
  }
}

template <typename x_t, typename out_t>
__global__ void rms_norm_grad_x_kernel(const out_t* __restrict__ grad_y,
                                       const x_t* __restrict__ x,
                                       const out_t* __restrict__ weight, x_t* __restrict__ grad_x,
                                       typename Acc<x_t>::type* __restrict__ inverse_rms,
                                       int64_t cols, double eps) {
  using A = typename Acc<x_t>::type;
  __shared__ A shared[32];
  const int64_t offset = blockIdx.x * cols;
  A sum_squares = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const A v = load(x[offset + c]);
    sum_squares += v * v;
  }
  sum_squares = block_reduce<A, false>(sum_squares, shared);
  const A scale = A(1) / sqrt(sum_squares / static_cast<A>(cols) + static_cast<A>(eps));
  if (threadIdx.x == 0) inverse_rms[blockIdx.x] = scale;
  A dot = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    dot += load(grad_y[offset + c]) * load(weight[c]) * load(x[offset + c]) * scale;
  }
  dot = block_reduce<A, false>(dot, shared) / static_cast<A>(cols);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const A xhat = load(x[offset + c]) * scale;
    const A g = load(grad_y[offset + c]) * load(weight[c]);
    grad_x[offset + c] = store<x_t>(scale * (g - xhat * dot));
  }
}

// Block (column tile, row block): partials[row block, c] = sum over its rows of
// grad_y * rounded(x * inverse rms), the inverse rms of each row from the grad_x kernel.
template <typename x_t, typename out_t>
__global__ void rms_norm_grad_weight_kernel(const out_t* __restrict__ grad_y,
                                            const x_t* __restrict__ x,
                                            const typename Acc<x_t>::type* __restrict__ inverse_rms,
                                            typename Acc<x_t>::type* __restrict__ partials,
                                            int64_t rows, int64_t cols, int64_t row_blocks) {
  using A = typename Acc<x_t>::type;
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t first = blockIdx.y * rows / row_blocks, last = (blockIdx.y + 1) * rows / row_blocks;
  A total = 0;
  for (int64_t r = first; r < last && c < cols; ++r) {
    total += load(grad_y[r * cols + c]) * load(store<x_t>(load(x[r * cols + c]) * inverse_rms[r]));
  }
  if (c < cols) partials[blockIdx.y * cols + c] = total;
}

}  // namespace

void launch_rms_norm(const void* x, const void* weight, void* y, int64_t rows, int64_t cols,
                     double eps, DType x_dtype, DType out_dtype, void* stream) {
  if (rows == 0 || cols == 0) return;
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  dispatch(x_dtype, [&](auto x_tag) {
    using x_t = decltype(x_tag);
    if (out_dtype == x_dtype) {
      rms_norm_kernel<x_t, x_t><<<rows, kThreads, 0, cuda_stream>>>(
          static_cast<const x_t*>(x), static_cast<const x_t*>(weight), static_cast<x_t*>(y),
          cols, eps);
    } else {
      rms_norm_kernel<x_t, float><<<rows, kThreads, 0, cuda_stream>>>(
          static_cast<const x_t*>(x), static_cast<const float*>(weight),
          static_cast<float*>(y), cols, eps);
    }
  });
  check_launch("rms_norm");
}

void launch_rms_norm_backward(const void* grad_y, const void* x, const void* weight,
                              void* grad_x, void* inverse_rms, void* weight_partials,
                              int64_t rows, int64_t cols, int64_t row_blocks, double eps,
                              DType x_dtype, DType out_dtype, void* stream) {
  if (rows == 0 || cols == 0) return;
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  const dim3 tiles((cols + kThreads - 1) / kThreads, row_blocks);
  dispatch(x_dtype, [&](auto x_tag) {
    using x_t = decltype(x_tag);
    using A = typename Acc<x_t>::type;
    auto run = [&](auto out_tag) {
      using out_t = decltype(out_tag);
      rms_norm_grad_x_kernel<x_t, out_t><<<rows, kThreads, 0, cuda_stream>>>(
          static_cast<const out_t*>(grad_y), static_cast<const x_t*>(x),
          static_cast<const out_t*>(weight), static_cast<x_t*>(grad_x),
          static_cast<A*>(inverse_rms), cols, eps);
      rms_norm_grad_weight_kernel<x_t, out_t><<<tiles, kThreads, 0, cuda_stream>>>(
          static_cast<const out_t*>(grad_y), static_cast<const x_t*>(x),
          static_cast<const A*>(inverse_rms), static_cast<A*>(weight_partials), rows, cols,
          row_blocks);
    };
    if (out_dtype == x_dtype) {
      run(x_t());
    } else {
      run(float());
    }
  });
  check_launch("rms_norm_backward");
}

}  // namespace cuda
}  // namespace scaleforge
