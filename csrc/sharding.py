"""DTensor sharding rules of the scaleforge operators, so they run on tensor- and
sequence-parallel activations without gathering them.

Under sequence parallelism (parallel/tensor_parallel.py) the norms see x as a DTensor
sharded on the sequence with a replicated weight: rms_norm works on each shard alone
(rows are independent), and its backward returns grad_x with x's sharding and grad_weight
as a Partial sum over the shards. rope and swiglu work elementwise over rows: q, k, gate
and up keep any sharding but the last dimension's, cos and sin are replicated. No rule
is given for linear_cross_entropy: under tensor parallelism the loss stays on the
vocabulary-sharded logits (models/loss.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

_OPS = torch.ops.scaleforge
Placement = Shard | Replicate | Partial | None
Strategies = list[tuple[list[Placement], list[Placement]]]


def _row_dims(ndim: int) -> range:
    """The dimensions a row-wise operator may be sharded on: all but the last."""
    return range(ndim - 1)


@register_sharding(_OPS.rms_norm.default)
def _rms_norm(x: Any, weight: Any, eps: float) -> Strategies:
    strategies: Strategies = [([Replicate()], [Replicate(), Replicate(), None])]
    for dim in _row_dims(x.ndim):
        strategies.append(([Shard(dim)], [Shard(dim), Replicate(), None]))
    return strategies


@register_sharding(_OPS.rms_norm_backward.default)
def _rms_norm_backward(grad_y: Any, x: Any, weight: Any, eps: float) -> Strategies:
    strategies: Strategies = [
        ([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate(), None])
    ]
    for dim in _row_dims(x.ndim):
        strategies.append(([Shard(dim), Partial()], [Shard(dim), Shard(dim), Replicate(), None]))
    return strategies


def _rotation(q: Any, k: Any) -> Strategies:
    """rope and its backward: q and k sharded alike on a leading dimension, tables whole."""
    strategies: Strategies = [([Replicate()] * 2, [Replicate()] * 4)]
    for dim in _row_dims(min(q.ndim, k.ndim) - 1):  # not the position dimension either
        strategies.append(([Shard(dim)] * 2, [Shard(dim)] * 2 + [Replicate()] * 2))
    return strategies


@register_sharding(_OPS.rope.default)
def _rope(q: Any, k: Any, cos: Any, sin: Any) -> Strategies:
    return _rotation(q, k)


@register_sharding(_OPS.rope_backward.default)
def _rope_backward(grad_q: Any, grad_k: Any, cos: Any, sin: Any) -> Strategies:
    return _rotation(grad_q, grad_k)


@register_sharding(_OPS.swiglu.default)
def _swiglu(gate: Any, up: Any) -> Strategies:
    strategies: Strategies = [([Replicate()], [Replicate()] * 2)]
    for dim in range(gate.ndim):
        strategies.append(([Shard(dim)], [Shard(dim)] * 2))
    return strategies


@register_sharding(_OPS.swiglu_backward.default)
def _swiglu_backward(grad_y: Any, gate: Any, up: Any) -> Strategies:
    strategies: Strategies = [([Replicate()] * 2, [Replicate()] * 3)]
    for dim in range(gate.ndim):
        strategies.append(([Shard(dim)] * 2, [Shard(dim)] * 3))
    return strategies
