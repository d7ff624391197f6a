"""torch.compile applied per transformer block (after activation checkpointing, before FSDP),
so each block is one compiled region and FSDP's hooks stay outside the graphs."""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module) -> None:
    """Replace each block of `model.layers` by `torch.compile(block)` in place.

    The blocks share one shape, so the first compilation serves every layer. State-dict keys
    keep their names (`get_model_state_dict` strips the `_orig_mod.` prefix).
    """
    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, torch.compile(block))
