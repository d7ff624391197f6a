"""sdpa: `F.scaled_dot_product_attention(..., enable_gqa=True)`, any device and precision
(FlashAttention or cuDNN kernels on CUDA). Plain causal attention uses its causal flag; with
documents or a sliding window it takes a boolean mask (B or 1, 1, T, T): correct, memory
O(T^2). The one kernel with a context-parallel form (parallel/context_parallel.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaleforge.models.attention.kernel import AttentionKernel, Supports


class SdpaKernel(AttentionKernel):
    name = "sdpa"
    supports = Supports(context_parallel=True)

    def mask(self, document_ids: torch.Tensor | None, seq_len: int, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor | None:
        if document_ids is None and self.window is None:
            return None
        index = torch.arange(seq_len, device=device)
        distance = index[:, None] - index[None, :]  # (T, T): query position - key position
        visible = (distance >= 0) & (distance < (self.window or seq_len))
        if document_ids is None:
            return visible  # (T, T), broadcast over batch and heads
        same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
        return (same_document & visible)[:, None]  # (B, 1, T, T)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
