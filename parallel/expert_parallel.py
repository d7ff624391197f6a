"""Expert parallelism (`parallel.ep`): each MoE layer's experts sharded over ep ranks
borrowed from the data-parallel shard group (torchtitan's scheme), tokens moved to them and
back by all-to-all with variable splits.

    experts.w1, w3, w2   DTensor (E, ., .) Shard(0) on the "dp_shard" mesh: rank r holds
                         experts [r E/ep, (r+1) E/ep); not sharded further by FSDP (each
                         rank's experts are its share, as FSDP's would be)
    router, shared       plain parameters of the block, sharded by FSDP like any other
    dispatch             counts per expert exchanged (all_to_all_single of E integers),
                         split sizes read on the host (the one sync of the layer), tokens
                         sent (all_to_all_single, variable splits) and regrouped by local
                         expert; combine sends the outputs back the same way. Both are
                         autograd functions: backward runs the reverse all-to-all.
    gradients            FSDP averages the dense gradients over the dp ranks; an expert's
                         gradient arrives summed over every rank's tokens, so the
                         experts divide it by the dp size (`Experts.grad_scale`): the
                         same mean as one process.

Under tensor parallelism the MoE layer sees the whole sequence (all-gathered, as the MLP
does) and every tp rank of an ep group routes the same tokens; its output is cut back to
this rank's sequence shard (parallel/tensor_parallel.py). Within this build ep equals
dp_shard x cp and dp_replicate is 1 (`check_expert_parallel`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.moe import EXPERT_WEIGHTS, MoE, moe_layers
from scaleforge.parallel.topology import ParallelDims, Topology


def check_expert_parallel(ep: int, dims: ParallelDims, model: TransformerConfig) -> None:
    """Raise ConfigError (setting, value, fix) when `parallel.ep` does not fit the model or
    the layout."""
    if ep == 1:
        return
    if not model.moe.enabled:
        raise ConfigError(
            f"parallel.ep={ep} shards experts, but the model has none (model.moe.num_experts="
            "0); set parallel.ep=1 or give the model experts"
        )
    if ep != dims.dp_shard * dims.cp:  # cp > 1 with experts is refused by check_layout
        raise ConfigError(
            f"parallel.ep={ep} must equal parallel.dp_shard x cp = {dims.dp_shard * dims.cp}: "
            "expert-parallel ranks are the data-parallel shard ranks; set parallel.ep="
            f"{dims.dp_shard * dims.cp}"
        )
    if dims.dp_replicate != 1:
        raise ConfigError(
            f"parallel.ep={ep} with parallel.dp_replicate={dims.dp_replicate}: experts are "
            "not replicated across replica groups in this build; set parallel.dp_replicate=1"
        )
    if model.moe.num_experts % ep:
        raise ConfigError(
            f"parallel.ep={ep} does not divide model.moe.num_experts={model.moe.num_experts}; "
            "pick an ep that divides the experts"
        )


def widest_ep(model: TransformerConfig, dp_shard: int, dp_replicate: int = 1) -> int:
    """The expert-parallel size a planner picks for a layout: every dp_shard rank when the
    model has experts that dp_shard divides (and no replica groups), else 1."""
    fits = model.moe.enabled and model.moe.num_experts % dp_shard == 0 and dp_replicate == 1
    return dp_shard if fits else 1


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


class AllToAllDispatcher:
    """Sends expert-sorted tokens to the ranks of `group` holding their experts (expert e on
    rank e // local_experts) and the outputs back (the `models.moe.Dispatcher` contract)."""

    def __init__(self, group: dist.ProcessGroup, ep: int, num_experts: int):
        self.group, self.ep, self.local_experts = group, ep, num_experts // ep

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        received = torch.empty_like(counts)  # (ep x local): each source's tokens per expert
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.ep, self.local_experts)
        sizes = torch.stack([counts.view(self.ep, -1).sum(1), received.sum(1)])
        send, receive = sizes.tolist()  # host sync: the split sizes all-to-all needs
        tokens = _AllToAll.apply(x, receive, send, self.group)  # by (source, local expert)
        expert = torch.arange(self.local_experts, device=x.device).repeat(self.ep)
        expert = expert.repeat_interleave(received.flatten(), output_size=sum(receive))
        order = expert.argsort(stable=True)
        return tokens[order], received.sum(0), (order, send, receive)

    def combine(self, y: torch.Tensor, state: Any) -> torch.Tensor:
        order, send, receive = state
        unsorted = y[order.argsort()]  # back to (source, local expert) order
        return _AllToAll.apply(unsorted, send, receive, self.group)


def apply_expert_parallel(model: nn.Module, topology: Topology, ep: int) -> None:
    """Shard every MoE layer's experts of `model` (meta or materialised) over the dp_shard
    mesh and give the layer the all-to-all dispatcher (module docstring)."""
    mesh: DeviceMesh = topology.submesh("dp_shard")
    group = topology.group("dp_shard")
    dp = topology.dp_size
    for module in moe_layers(model).values():
        experts = module.experts
        for name in EXPERT_WEIGHTS:
            full = getattr(experts, name)
            sharded = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
            setattr(experts, name, nn.Parameter(sharded))
        experts.grad_scale = 1.0 / dp
        module.dispatcher = AllToAllDispatcher(group, ep, module.num_experts)


def expert_parameters(module: nn.Module) -> set[nn.Parameter]:
    """The expert weights of `module`'s MoE layers: sharded by expert parallelism, so FSDP
    leaves them out (an empty set without experts or without expert parallelism)."""
    return {getattr(layer.experts, name) for layer in module.modules()
            if isinstance(layer, MoE) for name in EXPERT_WEIGHTS
            if isinstance(getattr(layer.experts, name), DTensor)}
