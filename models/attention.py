"""The attention kernels behind one call (`attend`), and the per-document masks they take.

`model.attention` picks the kernel; every one is causal and serves grouped-query heads
without copies of K and V (kv head j serves query heads j*r .. j*r + r-1, r = n_heads /
n_kv_heads, Hugging Face's repeat_kv order):
- sdpa: `F.scaled_dot_product_attention(..., enable_gqa=True)`, any device. With documents
  it takes a boolean block-diagonal causal mask (B, 1, T, T): correct, memory O(T^2).
- flash: the flash-attn package (FlashAttention-3's `flash_attn_interface` on Hopper when
  installed, else FlashAttention-2's `flash_attn`); CUDA, bf16 or fp16. With documents it
  runs the varlen kernel over the flattened batch, one sequence per document.
- flex: `torch.nn.attention.flex_attention`, compiled, with a BlockMask (causal; and
  same-document with documents); CUDA.

Sliding window (`model.sliding_window` = w): query i sees keys i - w + 1 .. i only (Mistral's
and Hugging Face's rule); sdpa and flex take it in their masks, flash as its `window_size`.

Documents: `document_ids` (B, T) int64 says which document of its row each position belongs
to (data_pipeline.samples.document_ids: 0, 1, ... in order, an EOS in the document it ends).
With them no token attends to another document. `attention_mask` builds the mask once per
forward from them; every layer reuses it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from scaleforge.errors import ConfigError, check_choice

BACKENDS = ("sdpa", "flash", "flex")

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


# What each backend takes: sdpa a boolean (B, 1, T, T) mask (None: plain causal); flex a
# BlockMask; flash VarlenDocuments (None: plain causal).
AttentionMask = torch.Tensor | BlockMask | VarlenDocuments


def check_attention_backend(backend: str, device_type: str, precision: str,
                            prefix: str = "model.attention") -> None:
    """Raise ConfigError, in one line saying what would fix it, when `backend` cannot run
    on `device_type` ("cpu", "cuda") at `precision` ("fp32", "bf16", "fp16") here."""
    check_choice(prefix, backend, BACKENDS)
    if backend == "sdpa":
        return
    if device_type != "cuda":
        raise ConfigError(
            f"{prefix}={backend} runs on CUDA only and this run's device is {device_type}; "
            f"use {prefix}=sdpa (it masks documents on any device)"
        )
    if backend == "flash" and precision == "fp32":
        raise ConfigError(
            f"{prefix}=flash computes in bf16 or fp16 only and trainer.precision=fp32; "
            f"set trainer.precision=bf16, or use {prefix}=sdpa or flex"
        )
    if backend == "flash" and not flash_installed():
        raise ConfigError(f"{prefix}=flash needs the flash-attn package, which is not "
                          f"installed: {FLASH_INSTALL}; or use {prefix}=sdpa or flex")


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


@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    """flex_attention compiled once (eager flex materialises the whole score matrix)."""
    return torch.compile(flex_attention, dynamic=False)


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a document begins (every row's first position, and each
    position whose document differs from the one before)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: each position's offset from the start of its document (0 at each
    document's first token), for RoPE positions that restart at every document."""
    index = torch.arange(document_ids.size(1), device=document_ids.device)
    start = torch.where(document_starts(document_ids), index, 0).cummax(dim=1).values
    return index - start


def attention_mask(backend: str, document_ids: torch.Tensor | None, seq_len: int,
                   device: torch.device, window: int | None = None) -> AttentionMask | None:
    """What `attend` needs for a batch of `seq_len` positions: the causal mask, restricted to
    each document when `document_ids` (B, seq_len) is given and to the last `window` keys
    when a sliding window is; None where the kernel's own causal flag (and flash's window
    argument) is the whole mask."""
    if backend == "flex":
        if document_ids is None:
            return _causal_block_mask(seq_len, str(device), window)
        return _document_block_mask(document_ids, window)
    if backend == "flash":
        if document_ids is None:
            return None
        starts = document_starts(document_ids).flatten().nonzero().flatten()
        total = torch.tensor([document_ids.numel()], device=document_ids.device)
        return VarlenDocuments(torch.cat([starts, total]).to(torch.int32), seq_len)
    if document_ids is None and window is None:
        return None
    index = torch.arange(seq_len, device=device)
    distance = index[:, None] - index[None, :]  # (T, T): query position - key position
    visible = (distance >= 0) & (distance < (window or seq_len))
    if document_ids is None:
        return visible  # (T, T), broadcast over batch and heads
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return (same_document & visible)[:, None]  # (B, 1, T, T)


def _in_window(q_index: torch.Tensor, kv_index: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal, and within the sliding window when there is one (flex mask functions)."""
    causal = q_index >= kv_index
    return causal if window is None else causal & (q_index - kv_index < window)


@functools.cache
def _causal_block_mask(seq_len: int, device: str, window: int | None = None) -> BlockMask:
    def causal(batch: torch.Tensor, head: torch.Tensor, q_index: torch.Tensor,
               kv_index: torch.Tensor) -> torch.Tensor:
        return _in_window(q_index, kv_index, window)

    return create_block_mask(causal, None, None, seq_len, seq_len, device=device)


def _document_block_mask(document_ids: torch.Tensor, window: int | None = None) -> BlockMask:
    def causal_within_document(batch: torch.Tensor, head: torch.Tensor,
                               q_index: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
        same = document_ids[batch, q_index] == document_ids[batch, kv_index]
        return _in_window(q_index, kv_index, window) & same

    batch, seq_len = document_ids.shape
    return create_block_mask(causal_within_document, batch, None, seq_len, seq_len,
                             device=document_ids.device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
           mask: AttentionMask | None, window: int | None = None) -> torch.Tensor:
    """Causal attention of q (B, n_heads, T, hd) over k, v (B, n_kv_heads, T, hd) with
    `backend`, under `mask` from `attention_mask` (built with the same sliding `window`);
    returns (B, n_heads, T, hd)."""
    if backend == "sdpa":
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert isinstance(mask, torch.Tensor), "attention_mask gives sdpa a boolean mask"
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if backend == "flex":
        assert isinstance(mask, BlockMask), "attention_mask gives flex a BlockMask"
        out = _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=True)
        assert isinstance(out, torch.Tensor)  # without return_lse flex returns the output
        return out
    return _flash(q, k, v, mask, window)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: AttentionMask | None, window: int | None) -> torch.Tensor:
    """flash-attn on (B, T, heads, hd) views of q, k, v; the varlen kernel with documents.
    A sliding window w is flash's window_size (w - 1 keys to the left, none to the right)."""
    func, varlen_func = _flash_kernels()
    B, _, T, hd = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, heads, hd)
    window_size = (-1, -1) if window is None else (window - 1, 0)
    if mask is None:
        out = func(q, k, v, causal=True, window_size=window_size)
    else:
        assert isinstance(mask, VarlenDocuments), "attention_mask gives flash VarlenDocuments"
        cu_seqlens, max_seqlen = mask
        out = varlen_func(q.reshape(B * T, -1, hd), k.reshape(B * T, -1, hd),
                          v.reshape(B * T, -1, hd), cu_seqlens, cu_seqlens, max_seqlen,
                          max_seqlen, causal=True, window_size=window_size)
    # Some FlashAttention-3 releases return (out, softmax_lse).
    out = out[0] if isinstance(out, tuple) else out
    return out.view(B, T, -1, hd).transpose(1, 2)  # (B, n_heads, T, hd)
