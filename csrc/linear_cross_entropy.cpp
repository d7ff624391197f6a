// Linear + cross-entropy in chunks of tokens, for every device: the mean over the tokens
// whose target is not ignore_index of -log softmax(hidden @ weight^T)[target], without the
// (N, V) logits ever existing. Each chunk of `chunk` tokens is multiplied out by ATen's
// matrix product in the inputs' dtype (as F.linear would), upcast to fp32 (fp64 for fp64
// inputs) and handed to the device's row kernel; forward keeps one loss per token, backward
// recomputes each chunk's logits and turns them in place into their gradient, then into
// the chunk's rows of grad_hidden and a term of grad_weight (accumulated in fp32). Peak
// extra memory: one chunk of logits in the compute dtype, plus grad_weight in fp32.
#include "ops.h"

namespace scaleforge {

namespace {

// Logits per chunk: 64 MiB of fp32, 128 tokens of a 128k vocabulary.
constexpr int64_t kChunkElements = int64_t(1) << 24;

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "linear_cross_entropy: hidden must be (N, d) and weight (V, d), got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) &&
                  targets.scalar_type() == at::kLong,
              "linear_cross_entropy: targets must be int64 (N,) with N = ", hidden.size(0),
              ", got ", targets.scalar_type(), " ", targets.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type() &&
                  at::isFloatingType(hidden.scalar_type()),
              "linear_cross_entropy: hidden (", hidden.scalar_type(), ") and weight (",
              weight.scalar_type(), ") must share one floating dtype");
  TORCH_CHECK(hidden.device() == weight.device() && hidden.device() == targets.device(),
              "linear_cross_entropy: hidden, weight and targets on different devices");
}

int64_t tokens_per_chunk(int64_t chunk_tokens, int64_t V) {
  TORCH_CHECK(chunk_tokens >= 0, "linear_cross_entropy: chunk_tokens=", chunk_tokens,
              " must be >= 0 (0 picks ", kChunkElements, " / V)");
  return chunk_tokens > 0 ? chunk_tokens : std::max<int64_t>(1, kChunkElements / std::max<int64_t>(V, 1));
}

void cross_entropy_rows(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                        at::Tensor& losses, const c10::optional<at::Tensor>& scale) {
  if (logits.is_cpu()) {
    cross_entropy_rows_cpu(logits, targets, ignore_index, losses, scale);
    return;
  }
#ifdef SCALEFORGE_WITH_CUDA
  if (logits.is_cuda()) {
    cross_entropy_rows_cuda(logits, targets, ignore_index, losses, scale);
    return;
  }
#endif
  TORCH_CHECK(false, "linear_cross_entropy: no kernel for device ", logits.device());
}

// The chunk's logits (rows, V) in the compute dtype.
at::Tensor chunk_logits(const at::Tensor& hidden_rows, const at::Tensor& weight) {
  return at::mm(hidden_rows, weight.t()).to(compute_dtype(hidden_rows.scalar_type()));
}

}  // namespace

at::Tensor linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    int64_t ignore_index, int64_t chunk_tokens) {
  check_inputs(hidden, weight, targets);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const int64_t chunk = tokens_per_chunk(chunk_tokens, V);
  const auto acc = compute_dtype(hidden.scalar_type());
  auto token_losses = at::empty({N}, hidden.options().dtype(acc));
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t rows = std::min(chunk, N - start);
    auto logits = chunk_logits(hidden.narrow(0, start, rows), weight);
    auto losses = token_losses.narrow(0, start, rows);
    cross_entropy_rows(logits, targets.narrow(0, start, rows).contiguous(), ignore_index, losses,
                       c10::nullopt);
  }
  // A chunk without a trained token (an SFT micro-batch of prompts only) adds 0, not 0/0.
  const auto valid = (targets != ignore_index).sum().clamp_min(1).to(acc);
  return token_losses.sum() / valid;
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, int64_t ignore_index, int64_t chunk_tokens) {
  check_inputs(hidden, weight, targets);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const int64_t chunk = tokens_per_chunk(chunk_tokens, V);
  const auto acc = compute_dtype(hidden.scalar_type());
  // d(mean)/d(token loss): grad_loss / valid tokens, a device scalar (no host read).
  const auto scale = grad_loss.to(acc) / (targets != ignore_index).sum().clamp_min(1).to(acc);
  auto grad_hidden = at::empty_like(hidden, at::MemoryFormat::Contiguous);
  auto grad_weight = at::zeros(weight.sizes(), weight.options().dtype(acc));
  auto unused_losses = at::empty({0}, hidden.options().dtype(acc));
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t rows = std::min(chunk, N - start);
    const auto hidden_rows = hidden.narrow(0, start, rows);
    auto logits = chunk_logits(hidden_rows, weight);
    cross_entropy_rows(logits, targets.narrow(0, start, rows).contiguous(), ignore_index,
                       unused_losses, scale);
    auto grad_rows = grad_hidden.narrow(0, start, rows);
    at::mm_out(grad_rows, logits.to(hidden.scalar_type()), weight);
    grad_weight.addmm_(logits.t(), hidden_rows.to(acc));
  }
  return {grad_hidden, grad_weight.to(weight.scalar_type())};
}

}  // namespace scaleforge
