"""Composition: build the model on the meta device, apply TP -> activation checkpointing ->
compile -> FSDP, then materialise only this rank's shards and fill them with the
single-process weights.

Sharded start-up (`init_sharded_weights`): every parameter is drawn from its own generator
keyed by (weight seed, parameter name) (models/init.py), so its values do not depend on
which rank draws it or in what order. Each rank draws, one at a time and on its device, the
full value of each parameter it holds a shard of, copies its shard out of it (a local cut,
no communication) and frees the full value. Peak memory
at start-up is this rank's shards plus the largest single parameter, no rank ever holds the
model, and the gathered weights of any layout equal the single-process weights bit for bit.

With pipeline parallelism (`build_pipelined_model`) the meta model is cut into this rank's
stages first, then each stage gets the same composition (split -> TP -> AC -> compile ->
FSDP, as torchtitan does) and is materialised and drawn the same way.

What to build is a `BuildPlan`: the model shape, the layout and the trainer's per-block
choices (`core.config.build_plan` makes it from the run's config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from scaleforge.models import build
from scaleforge.models.config import TransformerConfig
from scaleforge.models.init import (
    fill_parameter,
    init_rules,
    reset_buffers,
    rule_key,
    seed_from_global_rng,
)
from scaleforge.models.lora import freeze_base
from scaleforge.models.loss import cross_entropy
from scaleforge.models.transformer import Transformer
from scaleforge.parallel.activation_checkpoint import apply_activation_checkpointing
from scaleforge.parallel.compile import apply_compile
from scaleforge.parallel.config import ParallelConfig
from scaleforge.parallel.context_parallel import apply_context_parallel
from scaleforge.parallel.data_parallel import apply_data_parallel, uses_data_parallel
from scaleforge.parallel.dtensor import full_value
from scaleforge.parallel.expert_parallel import apply_expert_parallel, share_routing_over_cp
from scaleforge.parallel.float8 import apply_float8, gathers_weights_in_float8
from scaleforge.parallel.pipeline import Pipeline, build_pipeline
from scaleforge.parallel.tensor_parallel import apply_tensor_parallel
from scaleforge.parallel.topology import Topology


@dataclass(frozen=True)
class BuildPlan:
    """What to build on each rank: the model, its layout, and per block the precision,
    activation checkpointing (`none`, `full`, `selective`, on every n-th block) and
    torch.compile. `micro_batches` (per optimizer step and data-parallel rank) sizes the
    pipeline schedule. `fp8` is the float8 recipe of the blocks' linears (parallel/float8.py;
    none, tensorwise or rowwise)."""

    model: TransformerConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = "fp32"
    activation_checkpointing: str = "none"
    checkpoint_every_n_blocks: int = 1
    compile: bool = False
    micro_batches: int = 1
    fp8: str = "none"


def parallelize(model: Transformer, topology: Topology, plan: BuildPlan) -> None:
    """Apply this layout's parallelism to `model` in place, in the architecture's order:
    float8 conversion of the blocks' linears (optional, before any sharding, as torchao
    needs), expert and tensor parallel, context parallel, activation checkpointing, compile
    (optional), data-parallel sharding."""
    if plan.fp8 != "none":
        apply_float8(model, plan.fp8, topology.dims.tp,
                     gathers_weights_in_float8(plan.fp8, topology))
    if plan.parallel.ep > 1:
        apply_expert_parallel(model, topology, plan.parallel.ep, plan.parallel.etp)
    if topology.dims.tp > 1:
        apply_tensor_parallel(model, topology.submesh("tp"), plan.parallel.etp > 1)
    # LoRA's frozen weights stay frozen: a style that replaces a parameter (sequence
    # parallelism's norms) makes a new one that trains; before FSDP groups them.
    freeze_base(model)
    apply_context_parallel(model, topology, plan.parallel.cp_impl)
    share_routing_over_cp(model, topology)
    apply_activation_checkpointing(
        model, plan.activation_checkpointing, plan.checkpoint_every_n_blocks
    )
    if plan.compile:
        apply_compile(model)
    if uses_data_parallel(topology):
        apply_data_parallel(
            model, topology, plan.precision, plan.parallel.fsdp_reshard_after_forward
        )


def build_model(plan: BuildPlan, topology: Topology) -> Transformer:
    """The initialised, parallelised model of this rank.

    One process: `models.build` on the device, then activation checkpointing and compile, as
    the trainer always did. Several: meta -> `parallelize` -> `to_empty` (this rank's shards
    only) -> `init_sharded_weights`. The weight seed is one draw from torch's global
    generator, so call after seeding it identically on every rank (`seed_everything`).
    """
    if topology.dims.pp > 1:
        raise ValueError("parallel.pp > 1: build the stages with build_pipelined_model")
    seed = seed_from_global_rng()
    if not topology.is_distributed:
        model = build(plan.model, device=topology.device, seed=seed)
        parallelize(model, topology, plan)
        return model
    model = build(plan.model, device="meta")
    parallelize(model, topology, plan)
    model.to_empty(device=topology.device)
    init_sharded_weights(model, seed)
    return model


def build_pipelined_model(plan: BuildPlan, topology: Topology) -> Pipeline:
    """This rank's pipeline stages, parallelised, and the schedule that runs them.

    `build_pipeline` cuts the meta model into this rank's stages; each stage then gets
    tensor parallel, activation checkpointing, compile and FSDP like a whole model, and only
    its shards are materialised and drawn (`init_sharded_weights`, with the weight seed of
    `build_model`: one draw from torch's global generator, so call after seeding). The
    stage weights equal the single-process ones. The last stage's logits go to the chunked,
    vocabulary-parallel cross-entropy (models/loss.py), the loss `Transformer.loss` takes
    without fused kernels.
    """
    p = plan.parallel
    seed = seed_from_global_rng()
    ends: dict[str, Transformer] = {}  # this rank's first and last stage, when it has them

    def prepare_stage(stage: Transformer) -> None:
        parallelize(stage, topology, plan)
        stage.to_empty(device=topology.device)
        init_sharded_weights(stage, seed)
        ends.update({"first": stage} if stage.tok_embeddings is not None else {})
        ends.update({"last": stage} if stage.output is not None else {})
        first, last = ends.get("first"), ends.get("last")
        if plan.model.tie_embeddings and first and last and first.tok_embeddings and last.output:
            # A V schedule keeps both ends on rank 0, where to_empty gave each stage its own
            # copy of the tied weight: share one Parameter again (core.config.validate allows
            # this only without tp and dp, whose sharding would split the two anyway).
            last.output.weight = first.tok_embeddings.weight

    pipeline = build_pipeline(
        build(plan.model, device="meta"), topology.group("pp"), p.pp_schedule,
        p.pp_stages_per_rank, plan.micro_batches, cross_entropy, topology.device,
        p.pp_layers_per_stage, prepare_stage=prepare_stage,
    )
    return pipeline


@torch.no_grad()
def init_sharded_weights(model: Transformer, seed: int) -> None:
    """Fill a materialised, parallelised `model` (or pipeline stage) with the weights
    `models.build(..., seed=seed)` draws in one process, holding at most one full parameter
    at a time beside the shards (see the module docstring).

    A DTensor parameter's full value is drawn on its device and cut to this rank's shard
    locally; ones and zeros fill the shard directly. Buffers (RoPE tables, MoE state) are
    reset (`models.init.reset_buffers`).
    """
    cfg = model.cfg
    rules = init_rules(cfg)
    for name, param in model.named_parameters():
        key = rule_key(cfg, name)
        rule = rules[key]
        if not isinstance(param, DTensor):
            fill_parameter(param, rule, seed, key)
            continue
        local = param.to_local()
        if rule.kind != "normal":
            fill_parameter(local, rule, seed, key)
            continue
        full = torch.empty(param.shape, dtype=param.dtype, device=local.device)
        fill_parameter(full, rule, seed, key)
        local.copy_(_local_piece(full, param))
        del full
    reset_buffers(model)


def _local_piece(full: torch.Tensor, param: DTensor) -> torch.Tensor:
    """This rank's piece of `full`, the full value of DTensor `param`: a view for Shard and
    Replicate placements (DTensor shards by torch.chunk, mesh dim by mesh dim); other
    placements (FSDP's strided shard under tensor parallelism) go through
    `distribute_tensor`'s local cut, which copies the piece."""
    mesh, piece = param.device_mesh, full
    coordinate = mesh.get_coordinate()
    assert coordinate is not None, "this rank holds a shard, so it is in the mesh"
    for mesh_dim, placement in enumerate(param.placements):
        if type(placement) is Shard:
            chunks = torch.chunk(piece, mesh.size(mesh_dim), dim=placement.dim)
            index = coordinate[mesh_dim]
            piece = (chunks[index] if index < len(chunks)
                     else piece.narrow(placement.dim, 0, 0))  # torch.chunk made fewer
        elif not isinstance(placement, Replicate):
            cut = distribute_tensor(full, mesh, param.placements, src_data_rank=None)
            return cut.to_local()
    return piece


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered (unsharded) weights on CPU, on rank 0; an empty dict on other ranks.

    A collective: every rank must call it. Keys are the single-process state-dict keys.
    """
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    # torch types the values as any state-dict value; a model's are all tensors.
    return cast(dict[str, torch.Tensor], state)


def gathered_state_dict(model: nn.Module, topology: Topology) -> dict[str, torch.Tensor]:
    """The model's full weights with single-process keys: the plain state dict in one
    process; on CPU on rank 0 (empty elsewhere) when distributed. Collective.

    Tensor by tensor, so no GPU ever holds more than its shards plus one full tensor: torch's
    full state dict (`full_state_dict`) without pipeline parallelism. `model` is the model or
    a train module's `model_parts` (an nn.ModuleList of the model, or under pipeline
    parallelism of this rank's stages). Under pipeline parallelism the pp stages take turns; each
    tensor of a stage is gathered over the stage's tp/cp/dp ranks, and its rank at tp 0, cp 0,
    dp 0 sends it to rank 0 over rank 0's pp group (the ranks at tp 0, cp 0, dp 0), where it goes to
    CPU. Only tensor names, shapes and dtypes travel as Python objects.
    """
    parts = list(model) if isinstance(model, nn.ModuleList) else [model]
    local: dict[str, torch.Tensor] = {}
    for part in parts:
        local.update(part.state_dict())
    if not topology.is_distributed:
        return local
    if topology.dims.pp == 1:
        (whole,) = parts
        return full_state_dict(whole)
    group, device = topology.group("pp"), topology.device
    layouts: list[list[tuple[str, torch.Size, torch.dtype]]] = [[] for _ in range(topology.dims.pp)]
    dist.all_gather_object(layouts, [(k, v.shape, v.dtype) for k, v in local.items()],
                           group=group)
    sender = topology.dp_rank == 0 and topology.tp_rank == 0 and topology.cp_rank == 0
    gathered: dict[str, torch.Tensor] = {}
    for stage_rank, layout in enumerate(layouts):
        for key, shape, dtype in layout:
            if stage_rank == topology.pp_rank:
                value = full_value(local[key].detach())  # over this stage's tp/dp ranks
                if topology.is_rank0:
                    gathered[key] = value.cpu()
                elif sender:
                    dist.send(value.contiguous(), group=group, group_dst=0)
                del value
            elif topology.is_rank0:
                buffer = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buffer, group=group, group_src=stage_rank)
                gathered[key] = buffer.cpu()
    return gathered
