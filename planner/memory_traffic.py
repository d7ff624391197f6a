"""HBM traffic of the memory-bound work of a step: what runs at the GPU's memory bandwidth,
not at its matmul rate.

Counted per token on one tp rank, as our blocks run in eager PyTorch (one kernel per op,
each reading its inputs from and writing its output to HBM; planner/activations.py
describes the same ops and dtypes):

- norms: llama's RMSNorm casts its input to fp32, normalises (one fused kernel), casts
  back and multiplies by the weight; gpt's LayerNorm is one fused kernel;
- under autocast (bf16 without FSDP) each linear's input is cast to bf16 once per linear;
- RoPE (llama) on q and k: rotate-half, two products and a sum, about nine passes over
  each; attention's output is copied from (b, heads, s, hd) to (b, s, heads x hd);
- the MLP's activation (SiLU and the gate product, or GELU) and the two residual adds.

Backward reads each op's saved inputs and the incoming gradient and writes the outgoing
one: twice the forward's traffic (`BACKWARD_FACTOR`). Checkpointing (`full` or
`selective`) runs every memory-bound op of a wrapped block once more. The loss reads the
logits, casts them to fp32 and writes their gradient back in the compute dtype; AdamW reads
the parameters, gradients and both moments and writes three of them back (plus the norm
of the gradients clipping reads).
"""

from __future__ import annotations

from scaleforge.models.family import family_spec
from scaleforge.planner.activations import ActivationSetting

BACKWARD_FACTOR = 2.0
# Bytes per logit over the loss's forward and backward: cast to fp32 (read e, write 4),
# log-softmax (read 4, write 4), its backward (read 4 twice, write 4), cast of the gradient
# back to the compute dtype (read 4, write e); see loss_bytes_per_token.
LOSS_PASSES_FP32 = 4 + 4 + 4 + 12 + 4
# AdamW per parameter element (fp32): read param, grad, exp_avg, exp_avg_sq, write param
# and both moments; and gradient clipping's read of the gradient.
OPTIMIZER_BYTES_PER_ELEMENT = 4 * (4 + 3) + 4


def block_forward_bytes(x: ActivationSetting) -> float:
    """HBM bytes the memory-bound ops of one block's forward move per token on a tp rank,
    as the model's family counts them (models/decoder_counts.forward_traffic_bytes)."""
    return family_spec(x.model.family).counts.forward_traffic_bytes(x.model, x)


def block_step_bytes(x: ActivationSetting) -> float:
    """Forward, backward and (under checkpointing) recompute traffic of one block per token."""
    recompute = 1.0 if x.checkpointing != "none" else 0.0
    return (1 + BACKWARD_FACTOR + recompute) * block_forward_bytes(x)


def loss_bytes_per_token(x: ActivationSetting) -> float:
    """The final norm and the loss over the logits (vocabulary sharded by tp), per token."""
    m, e = x.model, x.compute_bytes
    norm_step = (1 + BACKWARD_FACTOR) * (2 + 4 * e) * m.d_model
    return norm_step + (LOSS_PASSES_FP32 + 2 * e) * m.vocab_rows / x.tp
