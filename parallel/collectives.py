"""Reductions over the ranks of a layout (`Topology`, parallel/topology.py), each a no-op in
one process. Which ranks a value is reduced over is in the name: the ranks that see
different tokens (the data-parallel ranks, dp_replicate x dp_shard, with different samples,
and the context-parallel ones, cp, with different chunks of the same samples), both as a
mean, or the world."""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist

from scaleforge.parallel.topology import Topology

T = TypeVar("T")


def sum_over_tokens(topology: Topology, value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over every rank that sees different tokens: the data-parallel
    ranks and, under context parallelism, the cp ranks (each holds its chunks of the
    replica's sequences), e.g. routed-token counts. One all-reduce (`tokens_group`)."""
    total = value.detach().clone()
    group = topology.tokens_group()
    if group is not None:
        dist.all_reduce(total, group=group)
    return total


def mean_over_dp_and_cp(topology: Topology, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the data- and context-parallel ranks, e.g. the step's loss
    for logging: each cp rank holds its chunks' mean, so their mean is the replica's, and
    the mean of those over the data-parallel ranks the step's."""
    if topology.dp_size == 1 and topology.dims.cp == 1:
        return value
    return sum_over_tokens(topology, value) / topology.dims.cp / topology.dp_size


def sum_over_world(topology: Topology, value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over every rank (one all-reduce on the default group); the
    value itself in one process."""
    total = value.detach().clone()
    if topology.is_distributed:
        dist.all_reduce(total)
    return total


def max_over_world(topology: Topology, value: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of a tensor over every rank (one all-reduce on the default
    group; `value` on this rank's device); the value itself in one process."""
    result = value.detach().clone()
    if topology.is_distributed:
        dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return result


def broadcast_from_rank0(topology: Topology, value: T) -> T:
    """Rank 0's `value` on every rank (e.g. the run directory, whose timestamp may differ)."""
    if not topology.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
