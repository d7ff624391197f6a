"""Build a model from its config, on the meta device first so no memory is spent twice."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from scaleforge.models.config import TransformerConfig, as_transformer_config
from scaleforge.models.transformer import Transformer


def build(
    cfg: TransformerConfig | DictConfig | Mapping[str, Any],
    device: torch.device | str = "cpu",
) -> Transformer:
    """Validate `cfg` and return an initialised model on `device`.

    The modules are created on the meta device (shapes only), then materialised on `device`
    with `to_empty` and filled by `init_weights` from torch's global RNG, so a 70B model never
    passes through CPU memory on its way to a GPU. device="meta" returns the shapes only,
    for counting parameters or for parallel/ to shard before materialising.
    Raises ConfigError naming the first inconsistent `model.*` setting.
    """
    cfg = as_transformer_config(cfg)
    cfg.check("model")
    with torch.device("meta"):
        model = Transformer(cfg)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model
