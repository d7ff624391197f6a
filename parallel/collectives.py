"""Reductions over the ranks of a layout (`Topology`, parallel/topology.py), each a no-op in
one process. Which ranks a value is reduced over is in the name: the ranks that see
different tokens (the data-parallel ranks, dp_replicate x dp_shard, with different samples,
and the context-parallel ones, cp, with different chunks of the same samples), both as a
mean, or the world.

`PROGRESS` counts the collectives this process joined through this module and names the
one it is in: the hang watchdog (core/callbacks/hang_watchdog.py) compares the counts of
the ranks to find the one that stopped first; fault drills hook in before a rank joins.
Collectives torch runs inside FSDP, tensor and pipeline parallelism are not counted here
(the watchdog counts them from torch's flight recorder)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

from scaleforge.parallel.topology import Topology

T = TypeVar("T")


@dataclass
class CollectiveProgress:
    """How far this process got through this module's collectives: `joined` counts those it
    entered, `current` names the one it is in (None between them); `before_join` hooks are
    called with a collective's name before this rank joins it (fault drills)."""

    joined: int = 0
    current: str | None = None
    before_join: list[Callable[[str], None]] = field(default_factory=list)


PROGRESS = CollectiveProgress()


@contextlib.contextmanager
def _joining(name: str) -> Iterator[None]:
    for hook in PROGRESS.before_join:
        hook(name)
    PROGRESS.joined += 1
    PROGRESS.current = name
    try:
        yield
    finally:
        PROGRESS.current = None


def sum_over_tokens(topology: Topology, value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over every rank that sees different tokens: the data-parallel
    ranks and, under context parallelism, the cp ranks (each holds its chunks of the
    replica's sequences), e.g. routed-token counts. One all-reduce (`tokens_group`)."""
    total = value.detach().clone()
    group = topology.tokens_group()
    if group is not None:
        with _joining("sum_over_tokens"):
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
        with _joining("sum_over_world"):
            dist.all_reduce(total)
    return total


def max_over_world(topology: Topology, value: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of a tensor over every rank (one all-reduce on the default
    group; `value` on this rank's device); the value itself in one process."""
    result = value.detach().clone()
    if topology.is_distributed:
        with _joining("max_over_world"):
            dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return result


def gather_from_world(topology: Topology, value: torch.Tensor) -> torch.Tensor:
    """Every rank's `value` stacked in rank order, shape (world_size, *value.shape): one
    all-gather on the default group; `value[None]` in one process."""
    if not topology.is_distributed:
        return value.detach()[None].clone()
    parts = [torch.empty_like(value) for _ in range(topology.world_size)]
    with _joining("gather_from_world"):
        dist.all_gather(parts, value.detach().contiguous())
    return torch.stack(parts)


def broadcast_from_rank0(topology: Topology, value: T) -> T:
    """Rank 0's `value` on every rank (e.g. the run directory, whose timestamp may differ)."""
    if not topology.is_distributed:
        return value
    holder = [value]
    with _joining("broadcast_from_rank0"):
        dist.broadcast_object_list(holder, src=0)
    return holder[0]
