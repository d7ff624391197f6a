"""The `model.kernels` switch: which code runs RMSNorm, RoPE, SwiGLU and the training loss.

- "torch": the PyTorch code (models/transformer.py, models/rope.py, models/loss.py).
- "fused": the scaleforge custom operators (csrc/, `import scaleforge.csrc` builds them on
  first use); same results within rounding (tests/test_kernels.py, tests/test_fused_model.py).
- "auto": fused on the device types in FUSED_BY_DEFAULT_ON, torch elsewhere.
(The setting's values and its check: models/config.py.)

The switch is read at each call from the input's device, so a model built on the meta
device and moved later picks the right code. Nothing is built unless "fused" is chosen
(`Transformer` loads the library when it is constructed, `load_fused`).
"""

from __future__ import annotations

import torch

# Device types on which the fused kernels were measured faster than torch (bench/kernels.py,
# bench/RESULTS.md): none so far. On the CPU rms_norm and rope beat torch eager but swiglu
# and the loss are slower (the loss recomputes its logits in backward), and the first use
# builds the library (about 3 minutes on 2 cores); on CUDA they are not measured yet
# (bench/kernels.py --cuda-check).
FUSED_BY_DEFAULT_ON: frozenset[str] = frozenset()


def uses_fused(kernels: str, device_type: str) -> bool:
    """Whether `model.kernels=kernels` runs the fused operators on `device_type` tensors."""
    return kernels == "fused" or (kernels == "auto" and device_type in FUSED_BY_DEFAULT_ON)


def load_fused(kernels: str) -> None:
    """Build and register the operators when `kernels` may pick them (KernelBuildError, one
    line, if they cannot be built here)."""
    if kernels == "fused" or (kernels == "auto" and FUSED_BY_DEFAULT_ON):
        import scaleforge.csrc  # noqa: F401  (registers torch.ops.scaleforge)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch.ops.scaleforge.rms_norm (x (..., d), weight (d,))."""
    from scaleforge.csrc import rms_norm as fused

    return fused(x, weight, eps)


def fused_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.scaleforge.rope: q and k (..., T, head_dim) rotated in one call."""
    from scaleforge.csrc import rope as fused

    return fused(q, k, cos, sin)


def fused_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """torch.ops.scaleforge.swiglu: silu(gate) * up."""
    from scaleforge.csrc import swiglu as fused

    return fused(gate, up)


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """torch.ops.scaleforge.linear_cross_entropy: mean loss of hidden (N, d) @ weight (V, d).T
    against targets (N,), without the (N, V) logits."""
    from scaleforge.csrc import linear_cross_entropy as fused

    return fused(hidden, weight, targets)
