"""Build a model from its config, on the meta device first so no memory is spent twice."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from scaleforge.models.config import TransformerConfig, as_transformer_config
from scaleforge.models.init import init_weights, seed_from_global_rng
from scaleforge.models.lora import apply_lora
from scaleforge.models.transformer import Transformer


def build(
    cfg: TransformerConfig | DictConfig | Mapping[str, Any],
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> Transformer:
    """Validate `cfg` and return an initialised model on `device`.

    The modules are created on the meta device (shapes only), then materialised on `device`
    with `to_empty` and filled by `models.init.init_weights`, each parameter from its own
    generator keyed by (`seed`, its name), so a 70B model never passes through CPU memory on
    its way to a GPU and a sharded start-up can draw the same weights piece by piece. `seed`
    None takes one draw from torch's global generator (so `torch.manual_seed` before the
    build fixes the weights). device="meta" returns the shapes only, for counting parameters
    or for parallel/ to shard before materialising.
    Raises ConfigError naming the first inconsistent `model.*` setting.
    """
    cfg = as_transformer_config(cfg)
    cfg.check("model")
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_lora(model, cfg.lora)  # the adapters of model.lora, the rest frozen (or nothing)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        init_weights(model, seed_from_global_rng() if seed is None else seed)
    return model
