"""The training loss: mean next-token cross-entropy in fp32, in chunks of tokens.

`F.cross_entropy(logits.float())` on the logits of N = B*T tokens over a vocabulary of V
keeps an fp32 copy of them, saves their fp32 log-softmax for backward and builds an fp32
gradient there: about 12 bytes per logit in all, 6 times the bf16 logits, 51 GB at 8 x 4096
tokens and a 128k vocabulary (bench/RESULTS.md). `cross_entropy` holds the logits and one
chunk of them in fp32 (CHUNK_ELEMENTS floats) instead:

- forward goes over `chunk_tokens` tokens at a time: it upcasts the chunk to fp32 and keeps
  three floats per token (max logit, sum of exp(logit - max), target logit); a token's
  log-softmax is (logit - max) - log(sum), its loss minus that at the target (the arithmetic
  of torch's log_softmax decomposition); it saves the logits, maxes and log-sums;
- backward goes over the same chunks again, recomputes the softmax in fp32 and writes the
  gradient, (softmax - onehot) x incoming gradient / valid tokens, over the logits in their
  own dtype, rounded once (the loss scale of fp16 is applied before the rounding). The LM
  head's backward needs its input and weight, not its output, so the logits' memory is free
  to hold their gradient; had anything else saved them, autograd would raise.

So the logits hold garbage after backward, and the caller should keep no reference to them
(the trainer passes the model's output straight in): the autograd graph keeps them until
backward, which turns them into the gradient. Targets equal to IGNORE_INDEX (-100, as in
F.cross_entropy) add neither loss nor gradient; the mean is over the other tokens.

Tensor parallelism: the logits are then a DTensor (B, T, V) sharded on the vocabulary
(Shard(2) on the 1-D tp mesh, parallel/tensor_parallel.py). Each rank runs the same chunks
over its V/tp columns and combines the per-token statistics over the tp group with two
all-reduces of N floats (the max, before the sums of exponentials are taken, then those
sums and the target logits), as Megatron's vocabulary-parallel cross-entropy does: the
logits are never gathered, a rank holds its shard and one chunk of it in fp32, and the
gradient is a DTensor of the same sharding. Each exponential is then the one a single
process computes; only the order of the sum differs. Backward needs no communication.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

IGNORE_INDEX = -100
# Logits per chunk: 64 MiB per fp32 copy (130 tokens of a 128k vocabulary).
CHUNK_ELEMENTS = 1 << 24


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """Mean next-token loss in fp32 over the tokens whose target is not IGNORE_INDEX.

    logits (B, T, V) in any float dtype, a plain tensor or a DTensor sharded on V; targets
    (B, T) int64 in [0, V) or IGNORE_INDEX. Returns a plain 0-dim fp32 tensor, the same on
    every tp rank. Backward overwrites the logits with their gradient (module doc).
    `chunk_tokens` (tokens per chunk) defaults to CHUNK_ELEMENTS // this rank's vocabulary.
    """
    loss: torch.Tensor = _ChunkedCrossEntropy.apply(logits, targets, chunk_tokens)
    return loss


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int | None
    ) -> torch.Tensor:
        local, vocab_start, group = _local_logits(logits)
        targets = targets.reshape(-1)
        chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // max(1, local.shape[1]))
        valid = targets != IGNORE_INDEX
        local_targets = targets - vocab_start
        in_shard = valid & (local_targets >= 0) & (local_targets < local.shape[1])
        local_targets = torch.where(in_shard, local_targets, 0)
        maxes, sums, target_logits = _token_statistics(local, local_targets, chunk, group)
        target_logits = torch.where(in_shard, target_logits, 0.0)
        if group is not None:
            sums_and_targets = torch.stack([sums, target_logits])
            dist.all_reduce(sums_and_targets, group=group)
            sums, target_logits = sums_and_targets
        # A token's log-softmax is (logit - max) - log(sum); its loss is minus that at the
        # target, as torch's log_softmax decomposition (and loss_parallel) computes them.
        log_sums = sums.log()
        # A micro-batch without a trained token (instruction data: prompts only) adds 0.
        valid_tokens = valid.sum().clamp(min=1)
        ctx.save_for_backward(logits, maxes, log_sums, local_targets, in_shard, valid,
                              valid_tokens)
        ctx.chunk = chunk
        token_losses = log_sums - (target_logits - maxes)
        return torch.where(valid, token_losses, 0.0).sum() / valid_tokens

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, maxes, log_sums, local_targets, in_shard, valid, valid_tokens = ctx.saved_tensors
        local, _, _ = _local_logits(logits)
        # d(loss)/d(token's loss): grad_output / valid tokens, 0 for an ignored token.
        scale = torch.where(valid, grad_output / valid_tokens, 0.0)
        for start in range(0, local.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            local[rows] = _chunk_gradient(local[rows], maxes[rows], log_sums[rows],
                                          local_targets[rows], in_shard[rows], scale[rows])
        grad = local.view(_local_shape(logits))
        if isinstance(logits, DTensor):
            grad = DTensor.from_local(grad, logits.device_mesh, logits.placements,
                                      run_check=False, shape=logits.shape,
                                      stride=logits.stride())
        return grad, None, None


def _local_shape(logits: torch.Tensor) -> torch.Size:
    return logits.to_local().shape if isinstance(logits, DTensor) else logits.shape


def _local_logits(
    logits: torch.Tensor,
) -> tuple[torch.Tensor, int, dist.ProcessGroup | None]:
    """(this rank's logits as a plain (N, V_local) view, the vocabulary index of its first
    column, the tp group to combine over or None)."""
    if not isinstance(logits, DTensor):
        return logits.detach().flatten(0, -2), 0, None
    mesh, placements = logits.device_mesh, logits.placements
    vocab_dim = logits.ndim - 1
    if mesh.ndim != 1 or not (isinstance(placements[0], Shard)
                              and placements[0].dim in (-1, vocab_dim)):
        raise ValueError(
            f"cross_entropy takes DTensor logits sharded on the vocabulary (Shard({vocab_dim}) "
            f"on a 1-D mesh); got {placements} on a {mesh.ndim}-D mesh"
        )
    local = logits.to_local().detach().flatten(0, -2)
    # Shard splits as torch.chunk does: every rank but the last holds ceil(V / tp) columns.
    columns = -(-logits.shape[-1] // mesh.size())
    return local, mesh.get_local_rank() * columns, mesh.get_group()


def _token_statistics(
    local: torch.Tensor, local_targets: torch.Tensor, chunk: int,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token of `local` (N, V_local), in fp32, going over `chunk` tokens at a time: the
    max logit over the whole vocabulary (all-reduced over `group`), this rank's sum of
    exp(logit - max) and its logit at `local_targets` (N,).

    With a group the max is reduced before the sums are taken, so each exp(logit - max)
    is the one a single process computes; only the order of the sum differs."""
    n = local.shape[0]
    maxes, sums, target_logits = (
        torch.empty(n, dtype=torch.float32, device=local.device) for _ in range(3)
    )
    chunks = [slice(start, start + chunk) for start in range(0, n, chunk)]
    for rows in chunks:
        if group is None:
            maxes[rows], sums[rows], target_logits[rows] = _chunk_statistics(
                local[rows], local_targets[rows]
            )
        else:
            maxes[rows], target_logits[rows] = _chunk_max_and_target(local[rows],
                                                                     local_targets[rows])
    if group is not None:
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        for rows in chunks:
            sums[rows] = _chunk_sum_exp(local[rows], maxes[rows])
    return maxes, sums, target_logits


# One chunk per function call: its fp32 copy is freed on return, before the next is made.
def _chunk_statistics(
    logits: torch.Tensor, local_targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, sum of exp(logit - max), logit at `local_targets`) per row of `logits`
    (n, V), in fp32, from one fp32 copy."""
    x = logits.to(torch.float32, copy=True)
    maxes = x.amax(dim=1)
    target_logits = x.gather(1, local_targets[:, None]).squeeze(1)
    return maxes, x.sub_(maxes[:, None]).exp_().sum(dim=1), target_logits


def _chunk_max_and_target(
    logits: torch.Tensor, local_targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, logit at `local_targets`) per row of `logits` (n, V_local), in fp32."""
    x = logits.float()
    return x.amax(dim=1), x.gather(1, local_targets[:, None]).squeeze(1)


def _chunk_sum_exp(logits: torch.Tensor, maxes: torch.Tensor) -> torch.Tensor:
    """Sum of exp(logit - max) per row of `logits` (n, V_local), in fp32."""
    return logits.to(torch.float32, copy=True).sub_(maxes[:, None]).exp_().sum(dim=1)


def _chunk_gradient(
    logits: torch.Tensor,
    maxes: torch.Tensor,
    log_sums: torch.Tensor,
    local_targets: torch.Tensor,
    in_shard: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """(softmax - onehot) x scale per row of `logits` (n, V_local), in fp32, with softmax =
    exp((logit - max) - log_sum); the onehot is set only in rows whose target column is in
    this shard."""
    x = logits.to(torch.float32, copy=True)
    probabilities = x.sub_(maxes[:, None]).sub_(log_sums[:, None]).exp_()
    onehot = in_shard[:, None].to(torch.float32)
    probabilities.scatter_add_(1, local_targets[:, None], -onehot)
    return probabilities.mul_(scale[:, None])
