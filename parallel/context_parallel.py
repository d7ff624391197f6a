"""Context parallelism (`parallel.cp`): each sequence split over the cp group, attention
over the whole sequence by all-gathering keys and values (Llama 3's design).

Layout. Rank r of the N cp ranks holds chunks r and 2N-1-r of each sequence's 2N chunks
(models/sequence_shard.py), which balances causal attention work. Every cp rank of a
data-parallel replica reads the same sequences (the loaders are keyed by the data-parallel
rank, which cp does not change) and keeps its chunks of the inputs and targets
(`batch_columns`, given to `data_pipeline.pack.split_batch`); document ids stay whole, for
the attention mask over all keys.

Contract of the all-gather (`gather_sequence`): forward all-gathers a (B, heads, T / N, hd)
tensor over the cp group into (B, heads, T, hd), the ranks' parts in rank order; backward
reduce-scatters the gradient (summed over the ranks whose queries read each key) back to
the rank that owns it. Only K and V travel, with their kv heads (few under grouped-query
attention; under tensor parallelism this rank's heads only); queries, the MLP and the loss
stay local. Parameters are the same on every cp rank and are sharded by FSDP over
dp_shard x cp (parallel/data_parallel.py), so the gradient average over that group adds
the cp ranks' chunk gradients the way it adds replicas' micro-batches.

Loss and counts: each rank's loss is the mean over its T / N tokens of each sequence; the
mean over the cp ranks (`Topology.sum_over_dp`, and the world mean of
`core.health.agree_on_step`) is the mean over every token once, since all chunks are equal.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from scaleforge.models.sequence_shard import SequenceShard, head_tail_chunks
from scaleforge.models.transformer import Transformer
from scaleforge.parallel.topology import Topology


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 2 over `group`; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        parts = local.movedim(2, 0).contiguous()  # (T / N, B, heads, hd)
        gathered = parts.new_empty((size * parts.size(0), *parts.shape[1:]))
        dist.all_gather_into_tensor(gathered, parts, group=group)
        return gathered.movedim(0, 2)  # (B, heads, T, hd)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        size = dist.get_world_size(ctx.group)
        parts = grad.movedim(2, 0).contiguous()  # (T, B, heads, hd)
        local = parts.new_empty((parts.size(0) // size, *parts.shape[1:]))
        dist.reduce_scatter_tensor(local, parts, group=ctx.group)
        return local.movedim(0, 2), None


def gather_sequence(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, heads, T / N, hd) on every cp rank -> (B, heads, T, hd), the ranks' parts in rank
    order; the gradient of each part is summed over the group and returned to its rank."""
    gathered: torch.Tensor = _GatherSequence.apply(local, group)
    return gathered


def apply_context_parallel(model: Transformer, topology: Topology) -> None:
    """Make `model` (or a pipeline stage) run on this rank's chunks of each sequence, with
    attention over the cp group's keys and values; a no-op without context parallelism."""
    if topology.dims.cp == 1:
        return
    model.sequence_shard = SequenceShard(topology.coordinates["cp"], topology.dims.cp,
                                         partial(gather_sequence, group=topology.group("cp")))


def batch_columns(topology: Topology, seq_len: int) -> tuple[slice, slice] | None:
    """The two ranges of positions of this rank's chunks in each sequence of `seq_len`
    tokens, to cut them out of a batch; None without context parallelism."""
    if topology.dims.cp == 1:
        return None
    return head_tail_chunks(seq_len, topology.coordinates["cp"], topology.dims.cp)
