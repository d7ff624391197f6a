"""The scaleforge operators as Python functions, with their autograd and fake kernels.

torch.ops.scaleforge.* are defined in C++ (registration.cpp: schemas, CPU kernels;
cuda/binding.cpp: CUDA kernels). Here each gets `register_fake` (output shapes and dtypes
without computing: torch.compile, the meta device and sf-plan's fake process group) and
`register_autograd`, whose backward calls the operator's `*_backward` twin, itself a
custom operator with a fake kernel. The functions below are what models/ calls.

Numerics, each against the PyTorch reference it replaces (tests/test_kernels.py):
- rms_norm: models/transformer.py's RMSNorm, statistics in fp32, the normalised x rounded
  to x's dtype before the weight multiplies in the promoted dtype.
- rope: models/rope.py's apply_rope on q and k at once, computed in fp32 with one rounding.
- swiglu: F.silu(gate) * up, computed in fp32 with one rounding.
- linear_cross_entropy: F.cross_entropy((hidden @ weight.T).float(), targets), mean over
  the tokens whose target is not ignore_index, in chunks of tokens (linear_cross_entropy.cpp).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
_OPS = torch.ops.scaleforge


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, -1) + eps); x (..., d), weight (d,). Output in the dtype
    x and weight promote to."""
    out: torch.Tensor = _OPS.rms_norm(x, weight, eps)
    return out


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (..., T, head_dim) rotated by position (rotate-halves); cos, sin (T, head_dim)."""
    q_out, k_out = _OPS.rope(q, k, cos, sin)
    return q_out, k_out


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up of one shape and dtype."""
    out: torch.Tensor = _OPS.swiglu(gate, up)
    return out


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T against targets, without the
    logits: hidden (N, d), weight (V, d), targets (N,) int64. A 0-dim tensor, fp32 (fp64
    for fp64 inputs); 0 with zero gradients when every target is ignore_index.
    `chunk_tokens` tokens at a time (0: 2^24 / V). Under autocast hidden and weight are cast
    to the autocast dtype first, as F.linear's inputs would be."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    loss: torch.Tensor = _OPS.linear_cross_entropy(hidden, weight, targets, ignore_index,
                                                   chunk_tokens)
    return loss


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("scaleforge::rms_norm")
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.result_type(x, weight))


@torch.library.register_fake("scaleforge::rms_norm_backward")
def _rms_norm_backward_fake(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


@torch.library.register_fake("scaleforge::rope")
def _rope_fake(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_output(q), _rope_output(k)


@torch.library.register_fake("scaleforge::rope_backward")
def _rope_backward_fake(
    grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_output(grad_q), _rope_output(grad_k)


def _rope_output(x: torch.Tensor) -> torch.Tensor:
    # The kernel keeps x's strides when its last dimension is contiguous (empty_like).
    return torch.empty_like(x if x.stride(-1) == 1 else x.contiguous())


@torch.library.register_fake("scaleforge::swiglu")
def _swiglu_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate.new_empty(gate.shape)


@torch.library.register_fake("scaleforge::swiglu_backward")
def _swiglu_backward_fake(
    grad_y: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.register_fake("scaleforge::linear_cross_entropy")
def _linear_cross_entropy_fake(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
    chunk_tokens: int,
) -> torch.Tensor:
    return hidden.new_empty((), dtype=_compute_dtype(hidden.dtype))


@torch.library.register_fake("scaleforge::linear_cross_entropy_backward")
def _linear_cross_entropy_backward_fake(
    grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    ignore_index: int, chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)


def _save_inputs(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    """setup_context for every operator: save the tensor inputs, keep the rest as attributes."""
    ctx.save_for_backward(*(value for value in inputs if isinstance(value, torch.Tensor)))
    ctx.constants = tuple(value for value in inputs if not isinstance(value, torch.Tensor))


def _rms_norm_backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
    x, weight = ctx.saved_tensors
    (eps,) = ctx.constants
    grad_x, grad_weight = _OPS.rms_norm_backward(grad_y, x, weight, eps)
    return grad_x, grad_weight, None


def _rope_backward(ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor) -> tuple[Any, ...]:
    _, _, cos, sin = ctx.saved_tensors
    grad_q, grad_k = _OPS.rope_backward(grad_q, grad_k, cos, sin)
    return grad_q, grad_k, None, None


def _swiglu_backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = _OPS.swiglu_backward(grad_y, gate, up)
    return grad_gate, grad_up


def _linear_cross_entropy_backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
    hidden, weight, targets = ctx.saved_tensors
    ignore_index, chunk_tokens = ctx.constants
    grad_hidden, grad_weight = _OPS.linear_cross_entropy_backward(
        grad_loss, hidden, weight, targets, ignore_index, chunk_tokens
    )
    return grad_hidden, grad_weight, None, None, None


torch.library.register_autograd("scaleforge::rms_norm", _rms_norm_backward,
                                setup_context=_save_inputs)
torch.library.register_autograd("scaleforge::rope", _rope_backward, setup_context=_save_inputs)
torch.library.register_autograd("scaleforge::swiglu", _swiglu_backward,
                                setup_context=_save_inputs)
torch.library.register_autograd("scaleforge::linear_cross_entropy",
                                _linear_cross_entropy_backward, setup_context=_save_inputs)
