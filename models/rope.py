"""Rotary position embedding (Su et al. 2021) in the rotate-half layout.

Channel i of a head is paired with channel i + head_dim/2 (GPT-NeoX and Hugging Face Llama
order, not Meta's interleaved pairs), so Hugging Face Llama weights load as a plain copy
with no permutation of the wq/wk rows.
"""

from __future__ import annotations

import torch


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (max_seq_len, head_dim), float32.

    Pair (i, i + head_dim/2) at position p turns by angle p * theta^(-2i/head_dim); the
    angles are written twice along the last dimension so they line up with both halves.
    """
    # Same expression as Hugging Face's inv_freq, so the tables match bit for bit.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (head_dim/2,)
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)  # (max_seq_len, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (max_seq_len, head_dim)
    return angles.cos(), angles.sin()


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
