"""Parameter shards of any rank of any layout, from the trainer's own parallelize code, in
one process.

`fake_world(n)` starts torch's fake process group (`backend="fake"`: every collective
returns at once, nothing is sent) as rank 0 of `n`, so `parallel.run_setup.init_topology`
builds a real DeviceMesh of any shape without the GPUs. `ShardProbe` then builds the model
on the meta device and applies `parallel.parallelize.parallelize` (tensor parallel,
activation checkpointing, FSDP) exactly as the trainer does, and reads each parameter's
local shard (`DTensor.to_local()`): shapes only, no memory.

What is built. Shard shapes depend on tp and dp_shard only (dp_replicate replicates whole
shards; the pipeline only decides which parameters a rank holds), so one probe per
(tp, dp_shard) serves every layout with those sizes. The probe is the model with one
block: blocks of one kind have the same parameter shapes and FSDP shards each parameter on
its own (dim 0 over dp_shard), so a block's shards are the same in every position and a
rank's bytes are its ends (embeddings; final norm and head) plus, per kind, its block count
times one block's. A Mixture-of-Experts model has two kinds (model.moe's dense layers and
MoE ones), probed apart. The rank measured is dp rank 0, tp rank 0: FSDP gives the first
dp ranks the rounded-up rows, so it holds the most; tp ranks hold equal shards (tp divides
every split dimension). Which layers and ends pipeline rank r holds comes from the
pipeline's own rules (`stage_indices`, `stage_layer_ranges`), as `split_model` cuts them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from scaleforge.core.config import Config, build_plan
from scaleforge.models import build
from scaleforge.parallel.expert_parallel import widest_ep
from scaleforge.parallel.expert_tensor_parallel import etp_for_layout
from scaleforge.parallel.parallelize import parallelize
from scaleforge.parallel.pipeline_schedules import (
    schedule_spec,
    stage_indices,
    stage_layer_ranges,
)
from scaleforge.parallel.run_setup import init_topology
from scaleforge.parallel.topology import ParallelDims

# AdamW's `step`: one fp32 scalar tensor per parameter (fused and capturable kernels keep
# it on the device).
ADAM_STEP_BYTES = 4


@dataclass(frozen=True)
class ParamShard:
    """One parameter on the measured rank: its local shard, and the tensor-parallel (for
    experts, expert-parallel) shard before FSDP split it (what FSDP all-gathers), in
    elements; its dtype's size in bytes; whether it trains (LoRA's frozen base does not:
    no gradient, no AdamW state)."""

    local_elements: int
    tp_local_elements: int
    element_bytes: int
    trainable: bool = True


@dataclass(frozen=True)
class RankState:
    """A rank's optimizer-side memory in bytes: parameters, gradients (the same shapes and
    dtype, fp32 master weights, but see `replicated_gradient_elements`) and AdamW state
    (exp_avg and exp_avg_sq in the parameter's dtype, plus a 4-byte step per parameter
    tensor), and its parameter tensor count. Frozen parameters count in `params` only."""

    params: int
    grads: int
    optimizer: int
    tensors: int


def adam_state_bytes(trained_bytes: int, trained_tensors: int) -> int:
    """AdamW's state for parameters of `trained_bytes` in `trained_tensors` tensors:
    exp_avg and exp_avg_sq in the parameters' dtype and a step per tensor."""
    return 2 * trained_bytes + ADAM_STEP_BYTES * trained_tensors


def replicated_gradient_elements(name: str, local_elements: int, dims: ParallelDims) -> int:
    """Elements of parameter `name`'s gradient (a full-model name, or a pipeline part's
    prefixed one) on a rank holding `local_elements` of it.

    Its shard's, except one case measured in torch 2.13 (bench/plan_memory.py): under
    tensor parallelism without data parallelism the vocabulary-parallel embedding's
    backward leaves a Replicate gradient of the whole table on every tp rank (FSDP, when
    present, reduce-scatters it to the shard)."""
    if name.endswith("tok_embeddings.weight") and dims.tp > 1 and dims.dp_size == 1:
        return local_elements * dims.tp
    return local_elements


@dataclass(frozen=True)
class GatheredElements:
    """What FSDP gathers on a rank, in elements of its tensor-parallel shards: all of the
    rank's parameters, one block's, and those outside the blocks (embeddings, final norm,
    head: FSDP's root unit, never resharded after forward)."""

    total: int
    block: int
    ends: int


def state_of_parameters(named_params: Iterator[tuple[str, nn.Parameter]],
                        dims: ParallelDims) -> RankState:
    """RankState of a built model's parameters (each once; DTensors by their local shard)
    under layout `dims`: how the dry run counts the trainer's own model. A frozen parameter
    (LoRA's base, models/lora.py) has no gradient and no AdamW state."""
    seen: set[int] = set()
    params_bytes = grads_bytes = trained_bytes = tensors = trained_tensors = 0
    for name, param in named_params:
        if id(param) not in seen:
            seen.add(id(param))
            local = param.to_local() if isinstance(param, DTensor) else param
            params_bytes += local.numel() * local.element_size()
            tensors += 1
            if not param.requires_grad:
                continue
            grads_bytes += local.element_size() * replicated_gradient_elements(
                name, local.numel(), dims)
            trained_bytes += local.numel() * local.element_size()
            trained_tensors += 1
    return RankState(params_bytes, grads_bytes, adam_state_bytes(trained_bytes, trained_tensors),
                     tensors)


def _shard(param: nn.Parameter) -> ParamShard:
    local = param.to_local() if isinstance(param, DTensor) else param
    tp_local = param.numel()
    if isinstance(param, DTensor) and param.device_mesh.mesh_dim_names is not None:
        for name, placement in zip(param.device_mesh.mesh_dim_names, param.placements,
                                   strict=True):
            if name in ("tp", "ep") and isinstance(placement, Shard):
                tp_local //= param.device_mesh[name].size()
    return ParamShard(local.numel(), tp_local, local.element_size(), param.requires_grad)


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """torch's fake process group as rank 0 of `world_size` for the duration (meshes of any
    shape up to that size can then be built); destroyed on exit."""
    if dist.is_initialized():
        raise RuntimeError("fake_world needs a process without torch.distributed started")
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class ShardProbe:
    """Per-parameter shards of `cfg`'s model under each (tp, dp_shard), built once each
    inside `fake_world` (see the module docstring) and cached."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._probes: dict[tuple[int, int, bool], dict[str, ParamShard]] = {}

    def shards(self, tp: int, dp_shard: int, moe: bool | None = None) -> dict[str, ParamShard]:
        """FQN -> ParamShard of the one-block model at dp rank 0, tp rank 0; its block a MoE
        one when `moe` (default: when the model has experts), else a dense one."""
        moe = self.cfg.model.moe.enabled if moe is None else moe
        key = (tp, dp_shard, moe)
        if key not in self._probes:
            self._probes[key] = self._build(tp, dp_shard, moe)
        return self._probes[key]

    def _build(self, tp: int, dp_shard: int, moe_block: bool) -> dict[str, ParamShard]:
        cfg = self.cfg
        # One block of the kind asked for: MoE (experts sharded as layout_config shards
        # them) or dense (a MoE model's dense layers: no experts, no ep).
        moe = (replace(cfg.model.moe, first_dense_layers=0, every_n_layers=1) if moe_block
               else replace(cfg.model.moe, num_experts=0))
        one_block = replace(cfg.model, n_layers=1, moe=moe)
        parallel = replace(cfg.parallel, tp=tp, pp=1, dp_replicate=1, dp_shard=dp_shard,
                           ep=widest_ep(one_block, dp_shard) if moe_block else 1,
                           etp=etp_for_layout(cfg.parallel.etp, tp) if moe_block else 1)
        dims = ParallelDims(tp=tp, pp=1, dp_replicate=1, dp_shard=dp_shard)
        model = build(one_block, device="meta")
        if dims.world_size > 1:
            topology = init_topology(parallel, dims, "cpu")
            plan = replace(build_plan(cfg, 1), model=one_block, parallel=parallel,
                           compile=False)
            parallelize(model, topology, plan)
        seen: set[int] = set()
        shards = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) not in seen:  # a tied head is the embedding: counted once
                seen.add(id(param))
                shards[name] = _shard(param)
        return shards

    def rank_state(
        self,
        dims: ParallelDims,
        pp_rank: int,
        schedule: str | None = None,
        stages_per_rank: int = 1,
        layers_per_stage: list[int] | None = None,
    ) -> tuple[RankState, GatheredElements]:
        """The state and FSDP's gathered elements of the rank at (pp_rank, dp 0, tp 0) of
        layout `dims` (pipeline `schedule` with `stages_per_rank` when dims.pp > 1)."""
        model = self.cfg.model
        owned, ranges = [0], [range(model.n_layers)]
        if dims.pp > 1 and schedule is not None:
            num_stages = dims.pp * stages_per_rank
            owned = stage_indices(pp_rank, dims.pp, stages_per_rank,
                                  schedule_spec(schedule).layout)
            ranges = stage_layer_ranges(model.n_layers, num_stages, layers_per_stage)
        layers = [layer for stage in owned for layer in ranges[stage]]
        moe_blocks = sum(model.moe.is_moe_layer(layer) for layer in layers)
        first, last = 0 in owned, len(ranges) - 1 in owned
        counted = []  # (FQN, shard, how many of it this rank holds)
        ends = block = 0
        for name, shard in self.shards(dims.tp, dims.dp_shard).items():
            if not name.startswith("layers."):  # embeddings on the first stage; final norm
                count = int(first if name.startswith(("tok_embeddings.", "pos_embeddings."))
                            else last)  # and LM head on the last
                counted.append((name, shard, count))
                ends += count * shard.tp_local_elements
        for moe, blocks in ((False, len(layers) - moe_blocks), (True, moe_blocks)):
            if blocks:
                block_shards = [(name, shard) for name, shard
                                in self.shards(dims.tp, dims.dp_shard, moe).items()
                                if name.startswith("layers.")]
                counted += [(name, shard, blocks) for name, shard in block_shards]
                block = max(block, sum(shard.tp_local_elements for _, shard in block_shards))
        params = grads = tensors = total = trained = trained_tensors = 0
        for name, shard, count in counted:
            params += count * shard.local_elements * shard.element_bytes
            total += count * shard.tp_local_elements
            tensors += count
            if shard.trainable:  # LoRA's frozen base: no gradient, no AdamW state
                grads += count * shard.element_bytes * replicated_gradient_elements(
                    name, shard.local_elements, dims)
                trained += count * shard.local_elements * shard.element_bytes
                trained_tensors += count
        state = RankState(params, grads, adam_state_bytes(trained, trained_tensors), tensors)
        return state, GatheredElements(total, block, ends)


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes of this rank's part of `tensor` (a DTensor's local shard)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()
