"""Global gradient-norm clipping across every parallel axis.

Gradients of a parallel model are DTensors (sharded over tp and/or dp_shard, replicated over
dp_replicate); a DTensor's norm is the norm of the full tensor, so summing squared norms
over parameters gives the norm of the whole model's gradient once, however it is sharded.
Parameters are grouped by mesh (a model may mix meshes) and, under pipeline parallelism,
each stage holds different parameters, so the squared norm is summed over the pp group.

Nothing here waits for the device: the norm, its all-reduce and the clip coefficient
(`nn.utils.clip_grads_with_norm_`: min(1, max_norm / (norm + 1e-6)) as a tensor, then
`_foreach_mul_`) stay queued on it; the caller reads the norm on the host when it needs it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


def reduce_partial_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """All-reduce every gradient that is a Partial(sum) DTensor (a sequence-parallel norm's
    weight) into a Replicate one, in place of leaving it to whichever op reads it first:
    torch 2.11's AdamW, reading them itself, kept moments 1.8x and 3.2x too large at tp 2
    (Adam's update hid it; a checkpoint resumed under another layout did not)."""
    for param in parameters:
        grad = param.grad
        if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
            param.grad = grad.redistribute(placements=[
                Replicate() if p.is_partial() else p for p in grad.placements])


def clip_grad_norm(
    parameters: Iterable[nn.Parameter],
    max_norm: float,
    pp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Scale gradients in place so their global 2-norm is at most `max_norm`.

    Returns the global norm before clipping (a plain scalar tensor, equal on every rank).
    Without DTensor gradients and pipeline stages this is `nn.utils.clip_grad_norm_`.
    """
    parameters = [p for p in parameters if p.grad is not None]
    reduce_partial_gradients(parameters)
    grads = [grad for p in parameters if (grad := p.grad) is not None]
    if pp_group is None and not any(isinstance(g, DTensor) for g in grads):
        return nn.utils.clip_grad_norm_(parameters, max_norm)
    # DTensor ops take one mesh at a time, so the norms and the scaling run per mesh.
    by_mesh: dict[object, list[nn.Parameter]] = {}
    for param in parameters:
        mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
        by_mesh.setdefault(mesh, []).append(param)
    squared = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for group in by_mesh.values():
        norm = nn.utils.get_total_norm(
            [grad for p in group if (grad := p.grad) is not None], norm_type=2.0
        )
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared = squared + norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(squared, group=pp_group)
    total = squared.sqrt()
    if max_norm < math.inf:
        for group in by_mesh.values():
            nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
