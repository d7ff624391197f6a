"""Activation checkpointing applied from outside the model, one transformer block at a time.

full: a wrapped block keeps only its input and recomputes everything in backward.
selective: torchtitan's op-level policy (torchtitan 0.3.0,
torchtitan/distributed/activation_checkpoint.py `SelectiveAC`): a wrapped block keeps the
output of every other projection matmul (the 1st, 3rd, ... `mm`/`addmm` of the block's
forward: wq, wv, w1 and w2 of a Llama block; wq, wv and w1 of a GPT one), of attention
(every SDPA kernel, flex attention, flash-attn's forward ops when installed) and of its
tensor-parallel collectives, and recomputes the rest: the other matmuls (wk, wo, w3 / w2)
and the cheap, memory-hungry ops (norms, activations, rotary, residual adds). Recomputing
half the matmuls costs about a sixth of the block's forward FLOPs and saves their outputs.
We keep one thing torchtitan does not: the all-gathers' outputs. That keeps backward from
repeating forward's communication: under tp the all-gathers before the column-parallel
matmuls and the reduce-scatters after the row-parallel ones run in forward only (DTensor
issues them as the `_c10d_functional` ops in SAVED_OPS), and backward runs just its own
gradient collectives; the price is each block's gathered, full-sequence matmul inputs.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    create_selective_checkpoint_contexts,
)

from scaleforge.models.transformer import Transformer
from scaleforge.torch_compat import (
    C10D_FUNCTIONAL,
    SDPA_CUDNN,
    SDPA_EFFICIENT,
    SDPA_FLASH,
    SDPA_FLASH_CPU,
    OpOverload,
    checkpoint_wrapper,
)

_aten = torch.ops.aten
_c10d = C10D_FUNCTIONAL
# The projection matmuls: selective checkpointing keeps every other one's output.
MATMUL_OPS = {_aten.mm.default, _aten.addmm.default}
# What selective checkpointing always keeps from forward (every op in neither set is
# recomputed in backward).
SAVED_OPS = {
    _aten.bmm.default,
    SDPA_FLASH.default,
    SDPA_EFFICIENT.default,
    SDPA_CUDNN.default,
    SDPA_FLASH_CPU.default,
    torch.ops.higher_order.flex_attention,
    _c10d.reduce_scatter_tensor.default,
    _c10d.all_gather_into_tensor.default,
    _c10d.all_reduce.default,
    _c10d.all_to_all_single.default,
}


# flash-attn's kernels, as the torch custom ops its package registers once imported
# (FlashAttention-2 >= 2.7 under flash_attn, -3 under flash_attn_3).
FLASH_OPS = (("flash_attn", "_flash_attn_forward"), ("flash_attn", "_flash_attn_varlen_forward"),
             ("flash_attn_3", "fwd"))


def _flash_ops() -> set[Any]:
    """The registered flash-attn forward ops (none without the package)."""
    found = set()
    for namespace, name in FLASH_OPS:
        packet = getattr(getattr(torch.ops, namespace), name, None)
        if packet is not None:
            found.add(packet.default)
    return found


def _selective_policy() -> Any:
    """A policy for one forward (or recompute) of one block: counts its matmuls, so it is
    made afresh for each (`context_fn` calls this once per checkpointed forward)."""
    matmuls = {False: 0, True: 0}  # seen so far, in forward and in the recompute

    def policy(ctx: SelectiveCheckpointContext, op: OpOverload, *args: Any,
               **kwargs: Any) -> CheckpointPolicy:
        if op in MATMUL_OPS:
            matmuls[ctx.is_recompute] += 1
            saved = matmuls[ctx.is_recompute] % 2 == 1
        else:
            saved = op in SAVED_OPS or op in _flash_ops()
        return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _selective_contexts() -> Any:
    return create_selective_checkpoint_contexts(_selective_policy())


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
            context_fn=_selective_contexts,
        )
    else:
        raise ValueError(f"trainer.activation_checkpointing={mode!r} is unknown")
    for index, (name, block) in enumerate(list(model.layers.named_children())):
        if index % every_n_blocks == 0:
            model.layers.register_module(name, wrap(block))
