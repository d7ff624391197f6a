"""torch.compile applied per transformer block (after activation checkpointing, before FSDP),
so each block is one compiled region and FSDP's hooks stay outside the graphs."""

from __future__ import annotations

from scaleforge.models.transformer import Transformer


def apply_compile(model: Transformer) -> None:
    """Compile each block of `model.layers` in place (`nn.Module.compile`).

    The blocks share one shape, so the first compilation serves every layer. The modules are
    not wrapped, so parameter names and state-dict keys do not change.
    """
    for block in model.layers.values():
        block.compile()
