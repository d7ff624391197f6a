// SwiGLU's gate on CUDA: y = silu(gate) * up elementwise in fp32 (fp64), one rounding.
#include "common.cuh"

namespace scaleforge {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void swiglu_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                              T* __restrict__ y, int64_t numel) {
  using A = typename Acc<T>::type;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const A x = load(gate[i]);
    y[i] = store<T>(x / (A(1) + exp(-x)) * load(up[i]));
  }
}

template <typename T>
__global__ void swiglu_backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ gate,
                                       const T* __restrict__ up, T* __restrict__ grad_gate,
                                       T* __restrict__ grad_up, int64_t numel) {
  using A = typename Acc<T>::type;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const A x = load(gate[i]), d = load(grad_y[i]);
    const A sigmoid = A(1) / (A(1) + exp(-x));
    grad_gate[i] = store<T>(d * load(up[i]) * sigmoid * (A(1) + x * (A(1) - sigmoid)));
    grad_up[i] = store<T>(d * x * sigmoid);
  }
}

}  // namespace

void launch_swiglu(const void* gate, const void* up, void* y, int64_t numel, DType dtype,
                   void* stream) {
  if (numel == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    swiglu_kernel<T><<<grid_for(numel, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(y), numel);
  });
  check_launch("swiglu");
}

void launch_swiglu_backward(const void* grad_y, const void* gate, const void* up,
                            void* grad_gate, void* grad_up, int64_t numel, DType dtype,
                            void* stream) {
  if (numel == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    swiglu_backward_kernel<T>
        <<<grid_for(numel, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
            static_cast<const T*>(grad_y), static_cast<const T*>(gate),
            static_cast<const T*>(up), static_cast<T*>(grad_gate), static_cast<T*>(grad_up),
            numel);
  });
  check_launch("swiglu_backward");
}

}  // namespace cuda
}  // namespace scaleforge
