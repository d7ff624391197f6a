// The row kernel of linear_cross_entropy on the CPU: softmax cross-entropy over each row of
// a chunk of logits in fp32 (fp64), forward (row losses) or backward (gradient in place).
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "../ops.h"

namespace scaleforge {

namespace {

template <typename acc_t>
void rows(acc_t* logits, const int64_t* targets, int64_t row_count, int64_t V,
          int64_t ignore_index, acc_t* losses, const acc_t* scale) {
  at::parallel_for(0, row_count, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* row = logits + r * V;
      const int64_t target = targets[r];
      const bool ignored = target == ignore_index;
      if (scale != nullptr && ignored) {
        std::fill(row, row + V, acc_t(0));
        continue;
      }
      acc_t max = -std::numeric_limits<acc_t>::infinity();
      for (int64_t v = 0; v < V; ++v) max = std::max(max, row[v]);
      acc_t sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - max);
      const acc_t log_sum = std::log(sum);
      if (scale == nullptr) {
        losses[r] = ignored ? acc_t(0) : log_sum - (row[target] - max);
        continue;
      }
      for (int64_t v = 0; v < V; ++v) row[v] = std::exp(row[v] - max - log_sum) * *scale;
      row[target] -= *scale;
    }
  });
}

}  // namespace

void cross_entropy_rows_cpu(
    at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, at::Tensor& losses,
    const c10::optional<at::Tensor>& scale) {
  const int64_t V = logits.size(1);
  const bool in_range =
      ((targets >= 0).logical_and(targets < V)).logical_or(targets == ignore_index).all()
          .item<bool>();
  TORCH_CHECK(in_range, "linear_cross_entropy: a target is outside [0, ", V,
              ") and is not ignore_index=", ignore_index);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cross_entropy_rows", [&] {
    rows<scalar_t>(logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), logits.size(0), V,
                   ignore_index, scale ? nullptr : losses.data_ptr<scalar_t>(),
                   scale ? scale->data_ptr<scalar_t>() : nullptr);
  });
}

}  // namespace scaleforge
