"""Activation checkpointing applied from outside the model, one transformer block at a time.

full: a wrapped block keeps only its input and recomputes everything in backward.
selective: a wrapped block keeps the outputs of its matmuls and attention (the expensive
ops) and of its tensor-parallel collectives, and recomputes the cheap, memory-hungry rest
(norms, activations, rotary, residual adds). Keeping the collectives' outputs (as
torchtitan does) keeps backward from repeating forward's communication: under tp the
all-gathers before the column-parallel matmuls and the reduce-scatters after the
row-parallel ones run in forward only (DTensor issues them as the `_c10d_functional` ops in
SAVED_OPS), and backward runs just its own gradient collectives. The price is memory: each
block keeps its gathered, full-sequence matmul inputs instead of recomputing them.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    create_selective_checkpoint_contexts,
)

from scaleforge.models.transformer import Transformer

_aten = torch.ops.aten
_c10d = torch.ops._c10d_functional
# What selective checkpointing keeps from forward (every other op is recomputed in backward).
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _c10d.reduce_scatter_tensor.default,
    _c10d.all_gather_into_tensor.default,
    _c10d.all_reduce.default,
    _c10d.all_to_all_single.default,
}


def _save_matmuls(
    ctx: SelectiveCheckpointContext, op: torch._ops.OpOverload, *args: Any, **kwargs: Any
) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Transformer, mode: str, every_n_blocks: int = 1) -> None:
    """Wrap every `every_n_blocks`-th block of `model.layers` in place (mode full|selective).

    State-dict keys are unchanged: torch's checkpoint_wrapper strips its own prefix.
    """
    if mode == "none":
        return
    if mode == "full":
        wrap = partial(checkpoint_wrapper, preserve_rng_state=True)
    elif mode == "selective":
        wrap = partial(
            checkpoint_wrapper,
            preserve_rng_state=True,
            context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls),
        )
    else:
        raise ValueError(f"trainer.activation_checkpointing={mode!r} is unknown")
    for index, (name, block) in enumerate(list(model.layers.named_children())):
        if index % every_n_blocks == 0:
            model.layers.register_module(name, wrap(block))
