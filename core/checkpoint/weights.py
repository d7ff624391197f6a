"""Weights only: start a run from a checkpoint's model (`trainer.init_from`), and the
model-only checkpoints `sf-convert` reads and writes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scaleforge.core.checkpoint.atomic_write import AtomicWrite
from scaleforge.core.checkpoint.paths import find_checkpoint
from scaleforge.core.checkpoint.safe_load import (
    check_model_kind,
    load_checkpoint_config,
    load_state,
    read_metadata,
    saved_shapes,
)
from scaleforge.core.checkpoint.state import (
    drop_tied,
    frozen_names,
    load_model_state,
    model_state,
)
from scaleforge.core.config import Config
from scaleforge.errors import ConfigError
from scaleforge.models import build
from scaleforge.models.config import TransformerConfig
from scaleforge.models.state_dict import check_state_dict_shapes


def load_model_weights(
    model: nn.Module, path: str | Path, setting: str, model_cfg: TransformerConfig | None = None,
    which: str = "all",
) -> Path:
    """Fill `model` (any layout; a pipeline's `model_parts`) with the weights of the
    checkpoint at `path` (a step directory or a run directory: the newest one), checked
    against `model_cfg` when given. `which` share of the model (`state.model_state`): "frozen"
    fills a LoRA model's base from a checkpoint without adapters, "trained" its adapters.
    Collective. Returns the checkpoint directory used."""
    found = find_checkpoint(path, setting)
    if model_cfg is not None:
        check_model_kind(found, model_cfg, setting)
    metadata = read_metadata(found)
    state = model_state(model, which)
    check_state_dict_shapes(
        state, saved_shapes(metadata, "model"), f"checkpoint {found}", allow_unexpected=True
    )
    wrapped = {"model": state}
    load_state(found, wrapped)
    load_model_state(model, wrapped["model"])
    return found


def save_model_checkpoint(
    state_dict: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path
) -> Path:
    """Write a model-only checkpoint (weights, config.yaml, complete.json) into `out_dir`,
    atomically, from one process: what `sf-convert from-hf` produces and
    `trainer.init_from` reads."""
    state = drop_tied(state_dict) if cfg.model.tie_embeddings else dict(state_dict)
    write = AtomicWrite(Path(out_dir), cfg, {"step": 0, "tokens": 0, "model_only": True})
    write.prepare()
    write.write({"model": state}, distributed=False)
    return write.commit()


def load_model_checkpoint(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, full single-process state dict on CPU) of a checkpoint, in one process
    without a process group. `path` as for `find_checkpoint`."""
    found = find_checkpoint(path, "ckpt")
    cfg = load_checkpoint_config(found)
    model = build(cfg.model, device=torch.device("cpu"))
    if frozen_names(model):  # adapters only: the frozen base is the run's trainer.init_from
        if not cfg.trainer.init_from:
            raise ConfigError(
                f"ckpt={found}: the model has frozen weights (model.lora) but the run names no "
                "trainer.init_from to read them from"
            )
        load_model_weights(model, cfg.trainer.init_from, "trainer.init_from", cfg.model,
                           "frozen")
    load_model_weights(model, found, "ckpt", cfg.model, "trained")
    return cfg, model.state_dict()
