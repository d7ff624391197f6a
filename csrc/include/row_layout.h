// Where row r of a strided tensor (..., T, D) starts, for kernels that take plain pointers.
// Plain C++ (no torch headers): the CUDA sources include it too.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SF_HOST_DEVICE __host__ __device__
#else
#define SF_HOST_DEVICE
#endif

namespace scaleforge {

constexpr int kMaxRowDims = 8;

// The sizes of every dimension but the last (the row), the last of them being T (the
// position), and the element strides of the input and the output over those dimensions;
// the last dimension is contiguous in both.
struct RowLayout {
  int ndim;
  int64_t sizes[kMaxRowDims];
  int64_t in_strides[kMaxRowDims];
  int64_t out_strides[kMaxRowDims];

  // (input offset, output offset, position t) of row `row`, rows counted in C order.
  SF_HOST_DEVICE void locate(int64_t row, int64_t* in_offset, int64_t* out_offset,
                             int64_t* position) const {
    int64_t in = 0, out = 0, t = 0;
    for (int dim = ndim - 1; dim >= 0; --dim) {
      const int64_t index = row % sizes[dim];
      row /= sizes[dim];
      if (dim == ndim - 1) t = index;
      in += index * in_strides[dim];
      out += index * out_strides[dim];
    }
    *in_offset = in;
    *out_offset = out;
    *position = t;
  }
};

}  // namespace scaleforge
