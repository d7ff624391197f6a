"""Expert tensor parallelism (`parallel.etp` = parallel.tp): each MoE layer's experts split
over the tp ranks by their hidden width, as the dense MLP is (parallel/tensor_parallel.py),
instead of every tp rank running them whole. torchtitan's expert_tensor_parallel_degree
(1 or tp) and Megatron's expert_tensor_parallel_size; etp 1 keeps the experts whole.

Layouts and collectives of a MoE layer under tp group of size t (B, T, d as in
parallel/tensor_parallel.py; h an expert's width, E_local the experts of this ep rank):

    input                the residual stream's Shard(1) shard (B, T/t, d) all-gathered on T
                         (`gather_sequence`); backward: reduce-scatter, which sums the
                         partial input gradients below over tp
    router               replicated over tp; every tp rank routes the same tokens. Its
                         gradient reaches it through the top-k combine weights from this
                         rank's share of the experts' width only: a partial sum, summed
                         over tp in backward (`MoEParallel.router`)
    experts.w1, w3       (E_local, h/t, d): Shard(1) on "tp" (columns), with Shard(0) on
                         "ep" under expert parallelism (the expert mesh's ("ep", "tp"))
    experts.w2           (E_local, d, h/t): Shard(2) on "tp" (rows)
    shared.w1, w3 / w2   the shared experts' SwiGLU split alike: Shard(0) / Shard(1) on "tp"
    dispatch             unchanged: tp ranks dispatch the same tokens within their own ep
                         group (the expert mesh's ep groups hold one tp index)
    output               each rank's routed + shared output is a partial sum over tp (its
                         columns of h), reduce-scattered on T to the Shard(1) shard
                         (`reduce_scatter_sequence`); backward: all-gather
    auxiliary loss       computed whole on every tp rank; its gradient divided by t
                         (`MoEParallel.gradient_copies`) since the tp ranks' gradients are
                         summed

Each expert weight's gradient is whole for its shard (every tp rank gets the whole output
gradient), so FSDP and the optimizer see ordinary sharded parameters; the expert load and
the auxiliary loss's value are equal on the tp ranks and counted once (parallel/expert_load.py).
Cost against etp 1: expert weights, their gradients and optimizer state and the experts'
activations per rank are 1/t; per MoE layer the output's reduce-scatter of (B, T, d) is
added (etp 1 cuts its whole output locally; backward: the input's reduce-scatter against a
local cut, the output's all-gather either way) and an all-reduce of the router's gradient
(E x d) per backward. Under expert parallelism every tp rank still sends the same tokens
through its ep group's all-to-all (t-fold dispatch traffic: one reason torchtitan dropped
its expert tensor parallelism in favour of ep borrowing tp ranks).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import PrepareModuleInputOutput, parallelize_module

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.moe import MoE, expert_hidden
from scaleforge.parallel.sequence_collectives import gather_sequence, reduce_scatter_sequence
from scaleforge.torch_compat import ParallelStyle

# The dim of each expert weight (E, out, in) holding the expert's width: w1, w3 split by
# columns, w2 by rows (ColwiseParallel / RowwiseParallel's split of nn.Linear weights).
EXPERT_WIDTH_DIMS = {"w1": 1, "w3": 1, "w2": 2}
# The same for the shared experts' nn.Linear weights (out, in).
SHARED_WIDTH_DIMS = {"w1": 0, "w3": 0, "w2": 1}


def check_expert_tensor_parallel(etp: int, tp: int, model: TransformerConfig) -> None:
    """Raise ConfigError (setting, value, fix) when `parallel.etp` does not fit the layout."""
    if etp == 1:
        return
    if etp != tp:
        raise ConfigError(
            f"parallel.etp={etp} must be 1 or parallel.tp={tp}: the experts' width is split "
            f"over the whole tp group or not at all; set parallel.etp=1 or {tp}"
        )
    if not model.moe.enabled:
        raise ConfigError(
            f"parallel.etp={etp} splits experts, but the model has none (model.moe."
            "num_experts=0); set parallel.etp=1"
        )
    hidden = expert_hidden(model)
    if hidden % tp:
        raise ConfigError(
            f"parallel.etp={etp} splits each expert's width over tp, but model.moe."
            f"expert_hidden={hidden} is not divisible by parallel.tp={tp}; set "
            f"model.moe.expert_hidden={-(-hidden // tp) * tp} or parallel.etp=1"
        )


def etp_for_layout(etp: int, tp: int) -> int:
    """The etp a planned layout of tensor-parallel size `tp` takes for the setting
    parallel.etp=`etp`: tp when experts are to be split (etp > 1), else 1."""
    return tp if etp > 1 else 1


def expert_placements(name: str, etp: int) -> list[Placement]:
    """The tp placement of expert weight `name` (w1, w3, w2) under `etp` (none at 1)."""
    return [Shard(EXPERT_WIDTH_DIMS[name])] if etp > 1 else []


class MoETensorParallel(ParallelStyle):
    """The tp plan of a MoE feed-forward, applied over `device_mesh` (the tp mesh).

    `split` (parallel.etp = tp): the experts (unless expert parallelism sharded them, on
    ("ep", "tp")) and the shared experts split by width, the input's sequence gathered and
    the partial output reduce-scattered back to it (the module docstring). Otherwise
    (etp 1) the experts and shared experts are replicated over tp, the input all-gathered
    on T as a local tensor and the output cut to this rank's T/t positions (backward:
    all-gather). Either way the router is replicated, so that every parameter of a tp
    model is a DTensor on its tp mesh (the optimizer's fused step takes no mix).
    """

    def __init__(self, split: bool):
        super().__init__()
        self.split = split

    def apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        """Place `module`'s (a MoE layer's) weights on the tp `device_mesh` and hook its
        input and output; returns it."""
        if not isinstance(module, MoE):
            raise TypeError(f"MoETensorParallel applies to a MoE, not a {type(module)}")
        _place(module.router, "weight", device_mesh, Replicate())
        for name, dim in EXPERT_WIDTH_DIMS.items():
            if not isinstance(getattr(module.experts, name), DTensor):
                _place(module.experts, name, device_mesh, self._layout(dim))
        if module.shared is not None:
            for name, dim in SHARED_WIDTH_DIMS.items():
                _place(getattr(module.shared, name), "weight", device_mesh, self._layout(dim))
        # Every weight of the layer is now a DTensor on the tp mesh (or, for experts under
        # expert parallelism, on ("ep", "tp")): the layer computes with the local parts.
        module.parallel = replace(module.parallel, weight=_to_local, router=_to_local)
        if not self.split:
            return parallelize_module(module, device_mesh, PrepareModuleInputOutput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                use_local_input=True, output_layouts=(Replicate(),),
                desired_output_layouts=(Shard(1),), use_local_output=False,
            ))
        group = device_mesh.get_group()
        module.parallel = replace(module.parallel, gradient_copies=device_mesh.size(),
                                  router=partial(_local_with_gradient_summed, group=group))
        module.register_forward_pre_hook(partial(_gather_input, group=group))
        module.register_forward_hook(partial(_scatter_output, mesh=device_mesh))
        return module

    def _layout(self, width_dim: int) -> Placement:
        return Shard(width_dim) if self.split else Replicate()


def _to_local(weight: torch.Tensor) -> torch.Tensor:
    assert isinstance(weight, DTensor), "MoETensorParallel made every weight a DTensor"
    return weight.to_local()


def _place(module: nn.Module, name: str, mesh: DeviceMesh, placement: Placement) -> None:
    param = getattr(module, name)
    placed = distribute_tensor(param, mesh, [placement], src_data_rank=None)
    setattr(module, name, nn.Parameter(placed))


def _gather_input(module: nn.Module, args: tuple[DTensor], group: dist.ProcessGroup
                  ) -> tuple[torch.Tensor]:
    """The residual stream's shard DTensor (B, T, d) Shard(1) -> the whole sequence as a
    local tensor (B, T, d) whose gradient is summed over tp."""
    return (gather_sequence(args[0].to_local(), group, dim=1),)


def _scatter_output(module: nn.Module, args: Any, output: torch.Tensor, mesh: DeviceMesh
                    ) -> DTensor:
    """This rank's partial sum (B, T, d) -> the sum's sequence shard, DTensor Shard(1)."""
    local = reduce_scatter_sequence(output, mesh.get_group(), dim=1)
    return DTensor.from_local(local, mesh, [Shard(1)], run_check=False)


class _SumGradient(torch.autograd.Function):
    """Identity; backward all-reduces (sums) the gradient over `group`."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


def _local_with_gradient_summed(weight: DTensor, group: dist.ProcessGroup) -> torch.Tensor:
    """A weight replicated over tp as a local tensor whose gradient is summed over `group`
    (on the weight's device): each tp rank's holds only its share of the experts' width."""
    summed: torch.Tensor = _SumGradient.apply(weight.to_local(), group)
    return summed
