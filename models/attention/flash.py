"""flash: the flash-attn package (FlashAttention-3's `flash_attn_interface` on Hopper when
installed, else FlashAttention-2's `flash_attn`); CUDA, bf16 or fp16. With documents it runs
the varlen kernel over the flattened batch, one sequence per document; a sliding window w is
its `window_size` (w - 1 keys to the left, none to the right)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from scaleforge.models.attention.documents import document_starts
from scaleforge.models.attention.kernel import AttentionKernel, Supports

FLASH_INSTALL = (
    "pip install flash-attn --no-build-isolation (it builds against the installed CUDA and "
    "torch; for FlashAttention-3 on Hopper, `python setup.py install` in hopper/ of "
    "github.com/Dao-AILab/flash-attention)"
)


class VarlenDocuments(NamedTuple):
    """The flattened batch's documents for flash-attn's varlen kernel: `cu_seqlens` (number
    of documents + 1,) int32, the offsets of the documents' first tokens in the B*T tokens
    followed by B*T; `max_seqlen`, an upper bound of their lengths (T: a host-side bound
    that needs no read of the device and no recompilation per batch)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


class FlashKernel(AttentionKernel):
    name = "flash"
    supports = Supports(devices=("cuda",), precisions=("bf16", "fp16"))

    @classmethod
    def missing(cls) -> str | None:
        if flash_installed():
            return None
        return f"the flash-attn package, which is not installed: {FLASH_INSTALL}"

    def mask(self, document_ids: torch.Tensor | None, seq_len: int, device: torch.device,
             dtype: torch.dtype) -> VarlenDocuments | None:
        if document_ids is None:
            return None  # the causal flag and window_size are the whole mask
        starts = document_starts(document_ids).flatten().nonzero().flatten()
        total = torch.tensor([document_ids.numel()], device=document_ids.device)
        return VarlenDocuments(torch.cat([starts, total]).to(torch.int32), seq_len)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: VarlenDocuments | None) -> torch.Tensor:
        func, varlen_func = _flash_kernels()
        B, _, T, hd = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, heads, hd)
        window_size = (-1, -1) if self.window is None else (self.window - 1, 0)
        if mask is None:
            out = func(q, k, v, causal=True, window_size=window_size)
        else:
            cu_seqlens, max_seqlen = mask
            out = varlen_func(q.reshape(B * T, -1, hd), k.reshape(B * T, -1, hd),
                              v.reshape(B * T, -1, hd), cu_seqlens, cu_seqlens, max_seqlen,
                              max_seqlen, causal=True, window_size=window_size)
        # Some FlashAttention-3 releases return (out, softmax_lse).
        out = out[0] if isinstance(out, tuple) else out
        return out.view(B, T, -1, hd).transpose(1, 2)  # (B, n_heads, T, hd)


def flash_installed() -> bool:
    """Whether a flash-attn package (FlashAttention-2 or -3) is importable here."""
    return any(importlib.util.find_spec(name) is not None
               for name in ("flash_attn_interface", "flash_attn"))


@functools.cache
def _flash_kernels() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(flash_attn_func, flash_attn_varlen_func): FlashAttention-3's on a Hopper GPU when
    `flash_attn_interface` is installed, else FlashAttention-2's."""
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    three = hopper and importlib.util.find_spec("flash_attn_interface") is not None
    package = importlib.import_module("flash_attn_interface" if three else "flash_attn")
    return package.flash_attn_func, package.flash_attn_varlen_func
