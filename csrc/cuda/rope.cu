// Rotary embedding on CUDA, rotate-halves layout (cpu/rope.cpp): one thread per channel pair,
// q's rows then k's in one launch; the backward is the inverse rotation.
#include "common.cuh"

namespace scaleforge {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void rope_kernel(const T* __restrict__ q, T* __restrict__ q_out, RowLayout q_layout,
                            int64_t q_rows, const T* __restrict__ k, T* __restrict__ k_out,
                            RowLayout k_layout, int64_t k_rows,
                            const typename Acc<T>::type* __restrict__ cos,
                            const typename Acc<T>::type* __restrict__ sin, int64_t head_dim,
                            bool inverse) {
  using A = typename Acc<T>::type;
  const int64_t half = head_dim / 2;
  const int64_t pairs = (q_rows + k_rows) * half;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < pairs; index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = index / half, i = index % half;
    const bool is_q = row < q_rows;
    const T* in = is_q ? q : k;
    T* out = is_q ? q_out : k_out;
    int64_t in_offset, out_offset, t;
    (is_q ? q_layout : k_layout).locate(is_q ? row : row - q_rows, &in_offset, &out_offset, &t);
    const A* c = cos + t * head_dim;
    const A* s = sin + t * head_dim;
    const A x1 = load(in[in_offset + i]), x2 = load(in[in_offset + i + half]);
    const A y1 = inverse ? x1 * c[i] + x2 * s[i + half] : x1 * c[i] - x2 * s[i];
    const A y2 = inverse ? x2 * c[i + half] - x1 * s[i] : x2 * c[i + half] + x1 * s[i + half];
    out[out_offset + i] = store<T>(y1);
    out[out_offset + i + half] = store<T>(y2);
  }
}

}  // namespace

void launch_rope(const void* q, void* q_out, const RowLayout& q_layout, int64_t q_rows,
                 const void* k, void* k_out, const RowLayout& k_layout, int64_t k_rows,
                 const void* cos, const void* sin, int64_t head_dim, bool inverse, DType dtype,
                 void* stream) {
  const int64_t pairs = (q_rows + k_rows) * (head_dim / 2);
  if (pairs == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    rope_kernel<T><<<grid_for(pairs, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(q), static_cast<T*>(q_out), q_layout, q_rows,
        static_cast<const T*>(k), static_cast<T*>(k_out), k_layout, k_rows,
        static_cast<const A*>(cos), static_cast<const A*>(sin), head_dim, inverse);
  });
  check_launch("rope");
}

}  // namespace cuda
}  // namespace scaleforge
