"""Rotary position embedding (Su et al. 2021) in the rotate-half layout.

Channel i of a head is paired with channel i + head_dim/2 (GPT-NeoX and Hugging Face Llama
order, not Meta's interleaved pairs), so Hugging Face Llama weights load as a plain copy
with no permutation of the wq/wk rows.
"""

from __future__ import annotations

import math

import torch

from scaleforge.models.config import RopeScaling


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (max_seq_len, head_dim), float32.

    Pair (i, i + head_dim/2) at position p turns by angle p * theta^(-2i/head_dim), its
    frequency rescaled by `scaling` (`scaled_frequencies`); the angles are written twice
    along the last dimension so they line up with both halves.
    """
    # Same expression as Hugging Face's inv_freq, so the tables match bit for bit.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = scaled_frequencies(1.0 / (theta**exponents), scaling)  # (head_dim/2,)
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)  # (max_seq_len, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (max_seq_len, head_dim)
    return angles.cos(), angles.sin()


def scaled_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling | None) -> torch.Tensor:
    """The rotation frequencies under `scaling` (config.RopeScaling), as Hugging Face's
    rope_type "linear" and "llama3" compute them.

    linear: every frequency / factor. llama3 (Llama 3.1): a pair whose wavelength 2 pi / f
    exceeds L / low_freq_factor (L = original_max_position_embeddings) turns `factor` times
    slower; one shorter than L / high_freq_factor is untouched; between the two, the
    frequency blends linearly in L / wavelength from the slow to the original one.
    """
    if scaling is None or scaling.type == "none":
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    context = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    slow = torch.where(wavelength > context / low, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * slow / scaling.factor + smooth * slow
    between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(between, blended, slow)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (..., T, head_dim) by their position; cos, sin (T, head_dim).

    The result keeps x's dtype: the tables are cast down rather than x promoted, so bf16
    queries and keys stay bf16 for the attention kernel.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
