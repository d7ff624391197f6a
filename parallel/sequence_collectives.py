"""Collectives along a sequence dimension with their autograd contracts.

    gather_sequence          forward: all-gather the ranks' parts along `dim` (rank order);
                             backward: reduce-scatter, each part's gradient summed over the
                             group (context parallelism's K/V, expert tensor parallelism's
                             MoE input)
    reduce_scatter_sequence  forward: sum partial tensors over the group and keep this rank's
                             part along `dim`; backward: all-gather the parts' gradients
                             (expert tensor parallelism's MoE output)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class _SequenceCollective(torch.autograd.Function):
    """All-gather (`gather`) or reduce-scatter (sum) along `dim` over `group`; backward runs
    the other one on the gradient."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, group: dist.ProcessGroup, dim: int,
                gather: bool) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.gather = group, dim, gather
        return (_all_gather if gather else _reduce_scatter)(value, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        collective = _reduce_scatter if ctx.gather else _all_gather
        return collective(grad, ctx.group, ctx.dim), None, None, None


def _all_gather(local: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    parts = local.movedim(dim, 0).contiguous()
    gathered = parts.new_empty((size * parts.size(0), *parts.shape[1:]))
    dist.all_gather_into_tensor(gathered, parts, group=group)
    return gathered.movedim(0, dim)


def _reduce_scatter(whole: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    parts = whole.movedim(dim, 0).contiguous()
    local = parts.new_empty((parts.size(0) // size, *parts.shape[1:]))
    dist.reduce_scatter_tensor(local, parts, group=group)
    return local.movedim(0, dim)


def gather_sequence(local: torch.Tensor, group: dist.ProcessGroup, dim: int = 2) -> torch.Tensor:
    """Each rank's part (size L along `dim`) -> the whole (size L x ranks), the ranks' parts
    in rank order; the gradient of each part is summed over the group and returned to its
    rank. The default `dim` is the sequence of (B, heads, T / N, hd)."""
    gathered: torch.Tensor = _SequenceCollective.apply(local, group, dim, True)
    return gathered


def reduce_scatter_sequence(partial: torch.Tensor, group: dist.ProcessGroup,
                            dim: int) -> torch.Tensor:
    """Partial sums (size L along `dim`) on every rank -> this rank's part of their sum
    (size L / ranks, the parts in rank order); the gradient is all-gathered."""
    local: torch.Tensor = _SequenceCollective.apply(partial, group, dim, False)
    return local
