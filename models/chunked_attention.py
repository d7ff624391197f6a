"""Causal attention of a few query chunks over the whole sequence's keys, without a mask.

Under context parallelism (parallel/allgather_attention.py) a rank's queries are chunks of c
tokens starting at global positions s_1, s_2, ... and the keys are all T tokens in sequence
order.
The queries of the chunk at s see keys [0, s) in full and keys [s, s + c) causally, so each
chunk is two kernel calls: one over the prefix without a mask, one over the square diagonal
block with the kernel's own causal flag. Their outputs are merged by their log-sum-exp (the
rule ring attention uses): lse = log(e^lse1 + e^lse2), out = e^(lse1 - lse) out1 +
e^(lse2 - lse) out2. Nothing of size queries x keys is made, and backward keeps what one
SDPA call keeps: q, k, v, the merged output and its log-sum-exp.

Backward calls each piece's kernel backward with the merged output and log-sum-exp: the
softmax over all the keys is exp(scores - merged lse) and its correction term is
rowsum(grad * merged output), so each call returns that piece's exact share of the
gradients, which are summed.

Kernels: on CPU the flash kernel behind CPU SDPA (`_scaled_dot_product_flash_attention_for_
cpu`, which serves grouped-query heads without copies); on CUDA the memory-efficient one
(`_scaled_dot_product_efficient_attention`, any dtype), which takes equal head counts: K and
V are repeated to the query heads inside each call and not kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from scaleforge.torch_compat import (
    SDPA_EFFICIENT,
    SDPA_EFFICIENT_BACKWARD,
    SDPA_FLASH_CPU,
    SDPA_FLASH_CPU_BACKWARD,
)

aten = torch.ops.aten
LSE_ALIGNMENT = 32  # the CUDA memory-efficient kernel pads its lse to a multiple of this


def repeat_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, n_kv_heads, S, hd) -> (B, n_heads, S, hd), kv head j serving heads j*r .. j*r+r-1."""
    return t.repeat_interleave(n_heads // t.size(1), dim=1)


def _sum_groups(grad: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, n_heads, S, hd) -> (B, n_kv_heads, S, hd): the gradient of `repeat_kv`."""
    B, H, S, hd = grad.shape
    return grad.view(B, n_kv_heads, H // n_kv_heads, S, hd).sum(2)


def _piece_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   causal: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]:
    """One kernel call: (output (B, H, L, hd), lse (B, H, L) fp32, what its backward needs)."""
    if q.device.type == "cpu":
        out, lse = SDPA_FLASH_CPU(q, k, v, 0.0, causal)
        return out, lse, ()
    out, lse, seed, offset = SDPA_EFFICIENT(
        q, repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1)), None, True, 0.0, causal)
    return out, lse[..., :q.size(2)], (seed, offset)


def _piece_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, causal: bool,
                    extra: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of one kernel call, given the merged `out` and `lse` of its queries."""
    if q.device.type == "cpu":
        grads: tuple[torch.Tensor, ...] = SDPA_FLASH_CPU_BACKWARD(
            grad, q, k, v, out, lse, 0.0, causal)
        return grads
    padded = F.pad(lse, (0, -lse.size(-1) % LSE_ALIGNMENT))
    dq, dk, dv, _ = SDPA_EFFICIENT_BACKWARD(
        grad, q, repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1)), None, out, padded,
        *extra, 0.0, [True, True, True, False], causal)
    return dq, _sum_groups(dk, k.size(1)), _sum_groups(dv, v.size(1))


def _merge(out: torch.Tensor, lse: torch.Tensor, piece_out: torch.Tensor,
           piece_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions of the same queries over disjoint keys -> over their union."""
    merged_lse = torch.logaddexp(lse, piece_lse)
    accumulate = torch.promote_types(out.dtype, torch.float32)  # bf16 outputs merge in fp32
    merged = (torch.exp(lse - merged_lse)[..., None] * out.to(accumulate)
              + torch.exp(piece_lse - merged_lse)[..., None] * piece_out.to(accumulate))
    return merged.to(out.dtype), merged_lse


def _pieces(start: int, length: int) -> list[tuple[slice, bool]]:
    """The key ranges of the query chunk [start, start + length) and whether each is causal:
    the prefix [0, start) in full (absent for the first chunk), the diagonal block causally."""
    diagonal = (slice(start, start + length), True)
    return [(slice(0, start), False), diagonal] if start else [diagonal]


class _ChunkedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                starts: tuple[int, ...]) -> torch.Tensor:
        length = q.size(2) // len(starts)
        outs, lses, extras = [], [], []
        for index, start in enumerate(starts):
            rows = q[:, :, index * length:(index + 1) * length]
            pieces = []
            for keys, causal in _pieces(start, length):
                piece_out, piece_lse, extra = _piece_forward(rows, k[:, :, keys], v[:, :, keys],
                                                             causal)
                pieces.append((piece_out, piece_lse))
                extras.append(extra)
            out, lse = pieces[0] if len(pieces) == 1 else _merge(*pieces[0], *pieces[1])
            outs.append(out)
            lses.append(lse)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.starts, ctx.extras = starts, extras
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        length = q.size(2) // len(ctx.starts)
        # The pieces' gradients are summed in fp32 (at least), rounded once as one kernel would.
        accumulate = torch.promote_types(q.dtype, torch.float32)
        dq, dk, dv = (torch.zeros_like(t, dtype=accumulate) for t in (q, k, v))
        extras = iter(ctx.extras)
        for index, start in enumerate(ctx.starts):
            rows = slice(index * length, (index + 1) * length)
            chunk = [t[:, :, rows].contiguous() for t in (grad, q, out, lse)]
            for keys, causal in _pieces(start, length):
                piece_dq, piece_dk, piece_dv = _piece_backward(
                    chunk[0], chunk[1], k[:, :, keys], v[:, :, keys], chunk[2], chunk[3],
                    causal, next(extras))
                dq[:, :, rows] += piece_dq
                dk[:, :, keys] += piece_dk
                dv[:, :, keys] += piece_dv
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             starts: tuple[int, ...]) -> torch.Tensor:
    """Causal attention of q (B, n_heads, n x c, hd), n chunks of c queries at the global
    positions starts[i] .. starts[i] + c - 1, over k, v (B, n_kv_heads, S, hd) in sequence
    order (S >= every chunk's end); returns (B, n_heads, n x c, hd). Scale 1 / sqrt(hd)."""
    out: torch.Tensor = _ChunkedCausalAttention.apply(q, k, v, starts)
    return out
