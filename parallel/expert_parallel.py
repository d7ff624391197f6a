"""Expert parallelism (`parallel.ep`): each MoE layer's experts sharded over ep ranks
borrowed from the dp_shard x cp ranks (torchtitan's scheme), tokens moved to them and back
by all-to-all with variable splits.

    expert mesh          ("pp", "dp_replicate", "efsdp", "ep", "tp") over the world
                         (`run_setup.build_expert_mesh`): the dp_shard x cp ranks cut into
                         efsdp x ep, ep inner. e.g. dp_shard 4, ep 2: ep groups [0, 1],
                         [2, 3]; efsdp groups [0, 2], [1, 3].
    experts.w1, w3, w2   DTensor (E, ., .) Shard(0) on "ep": ep rank r holds experts
                         [r E/ep, (r+1) E/ep); FSDP shards those again over "efsdp" and
                         replicates them over "dp_replicate" (HSDP), like the dense weights
                         over dp_shard x cp (parallel/data_parallel.py)
    router, shared       plain parameters of the block, sharded by FSDP like any other
    dispatch             counts per expert exchanged (all_to_all_single of E integers),
                         split sizes read on the host (the one sync of the layer), tokens
                         sent (all_to_all_single, variable splits) and regrouped by local
                         expert; combine sends the outputs back the same way. Both are
                         autograd functions: backward runs the reverse all-to-all.
    gradients            an expert's gradient arrives summed over its ep group's tokens;
                         FSDP sums it over efsdp and dp_replicate and divides by every
                         rank that saw different tokens (dp_replicate x dp_shard x cp,
                         `expert_gradient_divisor`): the same mean as the dense weights.

Under tensor parallelism the MoE layer sees the whole (local) sequence, all-gathered as the
MLP does, and every tp rank of an ep group routes the same tokens; its output is cut back to
this rank's sequence shard (parallel/tensor_parallel.py), or with parallel.etp = tp each
expert is split by width over tp and the partial outputs reduce-scattered
(parallel/expert_tensor_parallel.py). Under context parallelism each
rank routes its own chunks; the auxiliary loss takes its assignment fractions over the cp
group (`share_routing_over_cp`), so it equals the one of the whole sequences. Each layer
gets these through its `MoE.parallel` hooks (models/moe.py's `MoEParallel`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.moe import EXPERT_WEIGHTS, moe_layers
from scaleforge.parallel.expert_tensor_parallel import expert_placements
from scaleforge.parallel.topology import ParallelDims, Topology


def check_expert_parallel(ep: int, dims: ParallelDims, model: TransformerConfig) -> None:
    """Raise ConfigError (setting, value, fix) when `parallel.ep` or a MoE model does not fit
    the layout."""
    moe = model.moe
    if moe.enabled and dims.cp > 1 and moe.capacity_factor is not None:
        raise ConfigError(
            f"model.moe.capacity_factor={moe.capacity_factor} with parallel.cp={dims.cp}: the "
            "capacity counts a micro-batch's tokens in order, and a context-parallel rank "
            "holds only its chunks; set model.moe.capacity_factor=null (dropless) or "
            "parallel.cp=1"
        )
    if ep == 1:
        return
    if not moe.enabled:
        raise ConfigError(
            f"parallel.ep={ep} shards experts, but the model has none (model.moe.num_experts="
            "0); set parallel.ep=1 or give the model experts"
        )
    borrowed, widest = dims.dp_shard * dims.cp, widest_ep(model, dims.dp_shard, dims.cp)
    if borrowed % ep:
        raise ConfigError(
            f"parallel.ep={ep} does not divide parallel.dp_shard x cp = {dims.dp_shard} x "
            f"{dims.cp} = {borrowed}: expert-parallel ranks are borrowed from the data-parallel "
            f"shard and context-parallel ranks; set parallel.ep={widest}"
        )
    if moe.num_experts % ep:
        raise ConfigError(
            f"parallel.ep={ep} does not divide model.moe.num_experts={moe.num_experts}; "
            f"set parallel.ep={widest}"
        )


def widest_ep(model: TransformerConfig, dp_shard: int, cp: int = 1) -> int:
    """The expert-parallel size a planner picks for a layout: the largest that divides both
    the experts and dp_shard x cp (1 for a dense model)."""
    return math.gcd(model.moe.num_experts, dp_shard * cp) if model.moe.enabled else 1


def expert_gradient_divisor(topology: Topology) -> int:
    """What an expert's summed gradient is divided by: every rank that saw different
    tokens (dp_replicate x dp_shard x cp), as the dense gradients are averaged."""
    return topology.dp_size * topology.dims.cp


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad, input_splits, output_splits, ctx.group), None, None, None


def split_sizes_on_host(send: torch.Tensor, receive: torch.Tensor
                        ) -> tuple[list[int], list[int]]:
    """The tokens this rank sends to and receives from each ep rank, (ep,) each, read on
    the host: all-to-all takes its split sizes as Python integers. The one host sync of a
    MoE layer's forward under expert parallelism (again in backward when activation
    checkpointing recomputes the layer), as in Megatron's and torchtitan's dispatchers."""
    sizes: list[list[int]] = torch.stack([send, receive]).tolist()
    return sizes[0], sizes[1]


class AllToAllDispatcher:
    """Sends expert-sorted tokens to the ranks of `group` holding their experts (expert e on
    rank e // local_experts) and the outputs back (models/moe_parallel.py's `Dispatcher`)."""

    def __init__(self, group: dist.ProcessGroup, ep: int, num_experts: int):
        self.group, self.ep, self.local_experts = group, ep, num_experts // ep

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        received = torch.empty_like(counts)  # (ep x local): each source's tokens per expert
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.ep, self.local_experts)
        send, receive = split_sizes_on_host(counts.view(self.ep, -1).sum(1), received.sum(1))
        tokens = _AllToAll.apply(x, receive, send, self.group)  # by (source, local expert)
        expert = torch.arange(self.local_experts, device=x.device).repeat(self.ep)
        expert = expert.repeat_interleave(received.flatten(), output_size=sum(receive))
        order = expert.argsort(stable=True)
        return tokens[order], received.sum(0), (order, send, receive)

    def combine(self, y: torch.Tensor, state: Any) -> torch.Tensor:
        order, send, receive = state
        unsorted = y[order.argsort()]  # back to (source, local expert) order
        return _AllToAll.apply(unsorted, send, receive, self.group)


def apply_expert_parallel(model: nn.Module, topology: Topology, ep: int, etp: int = 1) -> None:
    """Shard every MoE layer's experts of `model` (meta or materialised) over the "ep" mesh
    (and by width over "tp" when `etp` > 1: the ("ep", "tp") mesh, parallel/
    expert_tensor_parallel.py) and give the layer the all-to-all dispatcher (module
    docstring) and the local experts to compute with (`MoE.parallel`); FSDP shards them
    further (parallel/data_parallel.py)."""
    mesh: DeviceMesh = topology.expert_submesh(("ep", "tp") if etp > 1 else "ep")
    group = topology.expert_submesh("ep").get_group()
    for module in moe_layers(model).values():
        experts = module.experts
        for name in EXPERT_WEIGHTS:
            full = getattr(experts, name)
            placements = [Shard(0), *expert_placements(name, etp)]
            sharded = distribute_tensor(full, mesh, placements, src_data_rank=None)
            setattr(experts, name, nn.Parameter(sharded))
        module.parallel = replace(module.parallel, weight=to_local,
                                  dispatcher=AllToAllDispatcher(group, ep, module.num_experts))


def share_routing_over_cp(model: nn.Module, topology: Topology) -> None:
    """Under context parallelism, make every MoE layer sum its routed-token counts over the
    cp group before its auxiliary loss (`MoEParallel.sum_over_sequence`): the loss's assignment
    fractions are then those of whole sequences; a no-op without cp."""
    if topology.dims.cp == 1:
        return
    group = topology.group("cp")
    for module in moe_layers(model).values():
        module.parallel = replace(module.parallel,
                                  sum_over_sequence=partial(_all_reduce_sum, group=group))


def to_local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (or replicated) weight, a DTensor."""
    assert isinstance(weight, DTensor), "a weight parallel/ sharded is a DTensor"
    return weight.to_local()


def _all_reduce_sum(value: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The sum of `value` (on this rank's device) over `group`; no gradient."""
    total = value.detach().clone()
    dist.all_reduce(total, group=group)
    return total
