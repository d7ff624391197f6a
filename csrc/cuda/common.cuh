// Shared device helpers of the .cu kernels: dtype conversion through fp32 (fp64) and block
// reductions. Plain CUDA: no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launchers.h"

namespace scaleforge {
namespace cuda {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type load(T value) {
  return static_cast<typename Acc<T>::type>(value);
}
template <> __device__ __forceinline__ float load<__half>(__half value) {
  return __half2float(value);
}
template <> __device__ __forceinline__ float load<__nv_bfloat16>(__nv_bfloat16 value) {
  return __bfloat162float(value);
}

template <typename T, typename A> __device__ __forceinline__ T store(A value) {
  return static_cast<T>(value);
}
template <> __device__ __forceinline__ __half store<__half, float>(float value) {
  return __float2half_rn(value);
}
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16, float>(float value) {
  return __float2bfloat16_rn(value);
}

// Sum (or max) of `value` over the block; every thread gets the result. `shared` holds one
// entry per warp (blockDim.x <= 1024).
template <typename A, bool kMax>
__device__ A block_reduce(A value, A* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const A other = __shfl_xor_sync(0xffffffff, value, offset);
    value = kMax ? (other > value ? other : value) : value + other;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps = (blockDim.x + 31) / 32;
  __syncthreads();  // `shared` may still be read from a previous reduction
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  A total = shared[0];
  for (int w = 1; w < warps; ++w) {
    total = kMax ? (shared[w] > total ? shared[w] : total) : total + shared[w];
  }
  return total;
}

inline void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("scaleforge ") + kernel + ": " +
                             cudaGetErrorString(error));
  }
}

inline int grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 32 ? (blocks > 0 ? blocks : 1) : 65535 * 32);
}

// Calls body(T()) for the storage type of `dtype`.
template <typename Body>
void dispatch(DType dtype, const Body& body) {
  switch (dtype) {
    case DType::kFloat32: body(float()); break;
    case DType::kFloat16: body(__half()); break;
    case DType::kBFloat16: body(__nv_bfloat16()); break;
    case DType::kFloat64: body(double()); break;
  }
}

}  // namespace cuda
}  // namespace scaleforge
