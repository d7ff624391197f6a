// The row kernel of linear_cross_entropy on CUDA (cpu/cross_entropy.cpp's contract): one
// block per row of a chunk of fp32 (fp64) logits; forward writes the row's loss, backward
// overwrites the row with (softmax - onehot) * scale.
#include "common.cuh"

namespace scaleforge {
namespace cuda {
namespace {

constexpr int kThreads = 512;

template <typename A>
__global__ void cross_entropy_rows_kernel(A* __restrict__ logits,
                                          const int64_t* __restrict__ targets, int64_t vocab,
                                          int64_t ignore_index, A* __restrict__ losses,
                                          const A* __restrict__ scale) {
  __shared__ A shared[32];
  A* row = logits + blockIdx.x * vocab;
  const int64_t target = targets[blockIdx.x];
  const bool ignored = target == ignore_index;
  if (scale != nullptr && ignored) {
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) row[v] = A(0);
    return;
  }
  A max = -INFINITY;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) max = row[v] > max ? row[v] : max;
  max = block_reduce<A, true>(max, shared);
  A sum = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) sum += exp(row[v] - max);
  const A log_sum = log(block_reduce<A, false>(sum, shared));
  if (scale == nullptr) {
    if (threadIdx.x == 0) losses[blockIdx.x] = ignored ? A(0) : log_sum - (row[target] - max);
    return;
  }
  const A s = *scale;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    row[v] = (exp(row[v] - max - log_sum) - (v == target ? A(1) : A(0))) * s;
  }
}

}  // namespace

void launch_cross_entropy_rows(void* logits, const int64_t* targets, int64_t rows,
                               int64_t vocab, int64_t ignore_index, void* losses,
                               const void* scale, bool fp64, void* stream) {
  if (rows == 0) return;
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (fp64) {
    cross_entropy_rows_kernel<double><<<rows, kThreads, 0, cuda_stream>>>(
        static_cast<double*>(logits), targets, vocab, ignore_index,
        static_cast<double*>(losses), static_cast<const double*>(scale));
  } else {
    cross_entropy_rows_kernel<float><<<rows, kThreads, 0, cuda_stream>>>(
        static_cast<float*>(logits), targets, vocab, ignore_index, static_cast<float*>(losses),
        static_cast<const float*>(scale));
  }
  check_launch("cross_entropy_rows");
}

}  // namespace cuda
}  // namespace scaleforge
