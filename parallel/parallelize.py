"""Composition: build the model on the meta device, apply TP -> activation checkpointing ->
compile -> FSDP, then materialise it and fill it with the single-process weights.

Weights are drawn once, on rank 0, exactly as a single process draws them (same seed, same
device, same order), and scattered into the sharded DTensors with
`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`: so the gathered
weights of any layout equal the single-process weights bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor

from scaleforge.core.config import Config
from scaleforge.core.errors import ConfigError
from scaleforge.models import build
from scaleforge.models.rope import rope_tables
from scaleforge.parallel.activation_checkpoint import apply_activation_checkpointing
from scaleforge.parallel.compile import apply_compile
from scaleforge.parallel.data_parallel import apply_data_parallel
from scaleforge.parallel.tensor_parallel import apply_tensor_parallel
from scaleforge.parallel.topology import Topology


def parallelize(model: nn.Module, topology: Topology, cfg: Config) -> None:
    """Apply this layout's parallelism to `model` in place, in the architecture's order:
    tensor parallel, activation checkpointing, compile (optional), data-parallel sharding."""
    if topology.dims.tp > 1:
        apply_tensor_parallel(model, topology.mesh["tp"])
    apply_activation_checkpointing(
        model, cfg.trainer.activation_checkpointing, cfg.trainer.checkpoint_every_n_blocks
    )
    if cfg.trainer.compile:
        apply_compile(model)
    if topology.dp_size > 1:
        apply_data_parallel(
            model, topology, cfg.trainer.precision, cfg.parallel.fsdp_reshard_after_forward
        )


def build_model(cfg: Config, topology: Topology) -> nn.Module:
    """The initialised, parallelised model of this rank.

    One process: `models.build` on the device, then activation checkpointing and compile, as
    the trainer always did. Several: meta -> `parallelize` -> `to_empty` -> weights from
    rank 0's single-process initialisation. Call after seeding torch's RNG.
    """
    if topology.dims.pp > 1:
        # Every rank raises this alike, so no rank is left waiting in a collective.
        raise ConfigError(
            f"parallel.pp={topology.dims.pp}: pipeline stages are built by the pipeline module "
            "(parallel/pipeline.py), which this build does not include; set parallel.pp=1 and "
            "use tp and dp_shard instead"
        )
    if not topology.is_distributed:
        model = build(cfg.model, device=topology.device)
        parallelize(model, topology, cfg)
        return model
    model = build(cfg.model, device="meta")
    parallelize(model, topology, cfg)
    model.to_empty(device=topology.device)
    load_single_process_weights(model, cfg, topology)
    return model


@torch.no_grad()
def load_single_process_weights(model: nn.Module, cfg: Config, topology: Topology) -> None:
    """Fill a materialised parallel `model` with the weights a single process would draw.

    Rank 0 builds the full model on its device from the current RNG state; every rank
    receives its shards by broadcast. Buffers outside the state dict (RoPE tables) are
    recomputed from the config.
    """
    full = build(cfg.model, device=topology.device).state_dict() if topology.is_rank0 else {}
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    if getattr(model, "rope_cos", None) is not None:
        m = cfg.model
        cos, sin = rope_tables(m.head_dim, m.max_seq_len, m.rope_theta, device=topology.device)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered (unsharded) weights on CPU, on rank 0; an empty dict on other ranks.

    A collective: every rank must call it. Keys are the single-process state-dict keys.
    """
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def gathered_state_dict(model: nn.Module, topology: Topology) -> dict[str, torch.Tensor]:
    """The model's full weights with single-process keys: the plain state dict in one
    process; gathered to CPU on rank 0 (empty elsewhere) when distributed. Collective."""
    if not topology.is_distributed:
        return model.state_dict()
    return full_state_dict(model)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the full value: DTensors (e.g. a loss under tensor parallelism) are
    gathered, plain tensors returned as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
