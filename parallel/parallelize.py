"""Composition: build the model on the meta device, apply TP -> activation checkpointing ->
compile -> FSDP, then materialise it and fill it with the single-process weights.

Weights are drawn once, on rank 0, exactly as a single process draws them (same seed, same
device, same order), and scattered into the sharded DTensors with
`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`: so the gathered
weights of any layout equal the single-process weights bit for bit.

With pipeline parallelism (`build_pipelined_model`) every rank draws the full model with the
seed instead (the same draws as one process), cuts its stages, and applies the same
composition to each stage (split -> TP -> AC -> compile -> FSDP, as torchtitan does).

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
    set_model_state_dict,
)

from scaleforge.models import build
from scaleforge.models.config import TransformerConfig
from scaleforge.models.rope import rope_tables
from scaleforge.models.transformer import Transformer
from scaleforge.parallel.activation_checkpoint import apply_activation_checkpointing
from scaleforge.parallel.compile import apply_compile
from scaleforge.parallel.config import ParallelConfig
from scaleforge.parallel.data_parallel import apply_data_parallel
from scaleforge.parallel.dtensor import full_value
from scaleforge.parallel.pipeline import LossFn, Pipeline, build_pipeline
from scaleforge.parallel.tensor_parallel import apply_tensor_parallel
from scaleforge.parallel.topology import Topology


@dataclass(frozen=True)
class BuildPlan:
    """What to build on each rank: the model, its layout, and per block the precision,
    activation checkpointing (`none`, `full`, `selective`, on every n-th block) and
    torch.compile. `micro_batches` (per optimizer step and data-parallel rank) sizes the
    pipeline schedule."""

    model: TransformerConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = "fp32"
    activation_checkpointing: str = "none"
    checkpoint_every_n_blocks: int = 1
    compile: bool = False
    micro_batches: int = 1


def parallelize(model: Transformer, topology: Topology, plan: BuildPlan) -> None:
    """Apply this layout's parallelism to `model` in place, in the architecture's order:
    tensor parallel, activation checkpointing, compile (optional), data-parallel sharding."""
    if topology.dims.tp > 1:
        apply_tensor_parallel(model, topology.submesh("tp"))
    apply_activation_checkpointing(
        model, plan.activation_checkpointing, plan.checkpoint_every_n_blocks
    )
    if plan.compile:
        apply_compile(model)
    if topology.dp_size > 1:
        apply_data_parallel(
            model, topology, plan.precision, plan.parallel.fsdp_reshard_after_forward
        )


def build_model(plan: BuildPlan, topology: Topology) -> Transformer:
    """The initialised, parallelised model of this rank.

    One process: `models.build` on the device, then activation checkpointing and compile, as
    the trainer always did. Several: meta -> `parallelize` -> `to_empty` -> weights from
    rank 0's single-process initialisation. Call after seeding torch's RNG.
    """
    if topology.dims.pp > 1:
        raise ValueError("parallel.pp > 1: build the stages with build_pipelined_model")
    if not topology.is_distributed:
        model = build(plan.model, device=topology.device)
        parallelize(model, topology, plan)
        return model
    model = build(plan.model, device="meta")
    parallelize(model, topology, plan)
    model.to_empty(device=topology.device)
    load_single_process_weights(model, plan.model, topology)
    return model


def build_pipelined_model(plan: BuildPlan, topology: Topology, loss_fn: LossFn) -> Pipeline:
    """This rank's pipeline stages, parallelised, and the schedule that runs them.

    The full model is drawn on every rank from the current RNG state (call after seeding),
    so each stage's weights equal the single-process ones; `build_pipeline` cuts the stages
    and frees the rest. Each stage then gets tensor parallel, activation checkpointing,
    compile and FSDP like a whole model. `loss_fn(logits, targets)` is the mean loss of a
    micro-batch.
    """
    p = plan.parallel
    return build_pipeline(
        build(plan.model, device=topology.device), topology.group("pp"), p.pp_schedule,
        p.pp_stages_per_rank, plan.micro_batches, loss_fn, topology.device,
        p.pp_layers_per_stage, prepare_stage=lambda stage: parallelize(stage, topology, plan),
    )


@torch.no_grad()
def load_single_process_weights(
    model: Transformer, model_cfg: TransformerConfig, topology: Topology
) -> None:
    """Fill a materialised parallel `model` with the weights a single process would draw.

    Rank 0 builds the full model on its device from the current RNG state; every rank
    receives its shards by broadcast. Buffers outside the state dict (RoPE tables) are
    recomputed from the config.
    """
    full = build(model_cfg, device=topology.device).state_dict() if topology.is_rank0 else {}
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    rope_cos, rope_sin = model.rope_cos, model.rope_sin  # None for gpt
    if isinstance(rope_cos, torch.Tensor) and isinstance(rope_sin, torch.Tensor):
        m = model_cfg
        cos, sin = rope_tables(m.head_dim, m.max_seq_len, m.rope_theta, device=topology.device)
        rope_cos.copy_(cos)
        rope_sin.copy_(sin)


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
    full state dict (`full_state_dict`) without pipeline parallelism. Under pipeline
    parallelism `model` is the pipeline's `model_parts`: the pp stages take turns; each
    tensor of a stage is gathered over the stage's tp/dp ranks, and its rank at tp 0, dp 0
    sends it to rank 0 over rank 0's pp group (the ranks at tp 0, dp 0), where it goes to
    CPU. Only tensor names, shapes and dtypes travel as Python objects.
    """
    if not topology.is_distributed:
        return model.state_dict()
    if topology.dims.pp == 1:
        return full_state_dict(model)
    if not isinstance(model, nn.ModuleList):
        raise TypeError(
            f"under pipeline parallelism gathered_state_dict takes the pipeline's model_parts "
            f"(an nn.ModuleList), not a {type(model).__name__}"
        )
    local: dict[str, torch.Tensor] = {}
    for part in model:
        local.update(part.state_dict())
    group, device = topology.group("pp"), topology.device
    layouts: list[list[tuple[str, torch.Size, torch.dtype]]] = [[] for _ in range(topology.dims.pp)]
    dist.all_gather_object(layouts, [(k, v.shape, v.dtype) for k, v in local.items()],
                           group=group)
    sender = topology.dp_rank == 0 and topology.tp_rank == 0
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
