"""flex: `torch.nn.attention.flex_attention`, compiled once, with a BlockMask (causal, within
the sliding window, and same-document with documents); CUDA (eager flex materialises the
whole score matrix and the compiled one has no CPU path worth taking)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from scaleforge.models.attention.kernel import AttentionKernel, Supports


class FlexKernel(AttentionKernel):
    name = "flex"
    supports = Supports(devices=("cuda",))

    def mask(self, document_ids: torch.Tensor | None, seq_len: int, device: torch.device,
             dtype: torch.dtype) -> BlockMask:
        if document_ids is None:
            return causal_block_mask(seq_len, str(device), self.window)
        return document_block_mask(document_ids, self.window)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: BlockMask) -> torch.Tensor:
        out = _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=True)
        assert isinstance(out, torch.Tensor)  # without return_lse flex returns the output
        return out


@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    """flex_attention compiled once (eager flex materialises the whole score matrix)."""
    return torch.compile(flex_attention, dynamic=False)


def _in_window(q_index: torch.Tensor, kv_index: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal, and within the sliding window when there is one (flex mask functions)."""
    causal = q_index >= kv_index
    return causal if window is None else causal & (q_index - kv_index < window)


@functools.cache
def causal_block_mask(seq_len: int, device: str, window: int | None = None) -> BlockMask:
    def causal(batch: torch.Tensor, head: torch.Tensor, q_index: torch.Tensor,
               kv_index: torch.Tensor) -> torch.Tensor:
        return _in_window(q_index, kv_index, window)

    return create_block_mask(causal, None, None, seq_len, seq_len, device=device)


def document_block_mask(document_ids: torch.Tensor, window: int | None = None) -> BlockMask:
    def causal_within_document(batch: torch.Tensor, head: torch.Tensor,
                               q_index: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
        same = document_ids[batch, q_index] == document_ids[batch, kv_index]
        return _in_window(q_index, kv_index, window) & same

    batch, seq_len = document_ids.shape
    return create_block_mask(causal_within_document, batch, None, seq_len, seq_len,
                             device=document_ids.device)
