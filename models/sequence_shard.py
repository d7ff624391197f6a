"""Context parallelism as the model sees it: this rank holds two of each sequence's chunks.

Under `parallel.cp` = N every sequence of T tokens is cut into 2N chunks of T / 2N tokens,
and rank r of the cp group holds chunks r and 2N-1-r (head and tail), so that every rank
has the same amount of causal attention work: an early chunk's queries see few keys, its
late partner's many. The model then runs on the rank's T / N tokens (B, T / N) as on any
sequence, except at two places:
- positions: RoPE (and GPT's learned positions) use each token's global position
  (`SequenceShard.positions`);
- attention: the queries of the rank's tokens attend over the keys and values of all T
  tokens, gathered from the cp group (`SequenceShard.gather`, supplied by parallel/). Plain
  causal attention needs no mask: each query chunk attends to the keys before it in full and
  to its own chunk causally (models/chunked_attention.py), after the gathered keys are put in
  sequence order. With documents or a sliding window, a mask of the rank's queries over all
  keys (in the gathered rank order) is built from the global positions of queries and keys,
  the whole sequence's document ids and the window (`SequenceShard.attention_mask`).

Under parallel.cp_impl=torch, plain causal layers run torch's context-parallel SDPA instead
(`SequenceShard.ring`, supplied by parallel/context_parallel.py; CUDA only).

Memory: the mask is T / N x T per micro-batch (32 MiB at 4,096 tokens and cp 2 in fp32;
1 GiB at 128k tokens and cp 16 in bf16), which is why plain causal attention does without.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from scaleforge.models.chunked_attention import chunked_causal_attention


def head_tail_chunks(seq_len: int, rank: int, size: int) -> tuple[slice, slice]:
    """The two ranges of positions, in a sequence of `seq_len` tokens, that rank `rank` of
    `size` holds: chunks `rank` and 2 x size - 1 - rank of 2 x size equal chunks (seq_len
    must be a multiple of 2 x size)."""
    if seq_len % (2 * size):
        raise ValueError(f"a sequence of {seq_len} tokens does not split into 2 x {size} "
                         "equal chunks")
    chunk = seq_len // (2 * size)
    tail = (2 * size - 1 - rank) * chunk
    return slice(rank * chunk, (rank + 1) * chunk), slice(tail, tail + chunk)


def head_tail_positions(seq_len: int, rank: int, size: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """(seq_len // size,) int64: the positions of `head_tail_chunks`' tokens, in order."""
    return torch.cat([torch.arange(part.start, part.stop, device=device)
                      for part in head_tail_chunks(seq_len, rank, size)])


# (q, k, v) of this rank's chunks -> this rank's rows of causal attention over the group.
RingAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ShardedMask(NamedTuple):
    """What each attention layer gets under context parallelism, made once per forward: the
    function that gathers keys or values (B, kv heads, T / N, hd) -> (B, kv heads, T, hd)
    in rank order, and either the additive mask (B or 1, 1, T / N, T) of this rank's queries
    over those keys (0: attend, -inf: not; in the queries' dtype, since SDPA would turn a
    boolean one into a float copy in every layer and keep each for backward), or, for plain
    causal attention, no mask and the order (T,) that puts the gathered keys in sequence
    order, with the global starts of this rank's two query chunks. With `ring`
    (`SequenceShard.ring`) that function is the whole attention instead."""

    gather: Callable[[torch.Tensor], torch.Tensor]
    mask: torch.Tensor | None
    key_order: torch.Tensor | None = None
    query_starts: tuple[int, ...] = ()
    ring: RingAttention | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of this rank's q (B, n_heads, T / N, hd) over the keys and values of
        every rank, k, v (B, n_kv_heads, T / N, hd) here; returns (B, n_heads, T / N, hd)."""
        if self.ring is not None:
            return self.ring(q, k, v)
        k, v = self.gather(k), self.gather(v)  # (B, n_kv_heads, T, hd), in rank order
        if self.mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)
        assert self.key_order is not None, "plain causal attention puts the keys in order"
        k, v = k.index_select(2, self.key_order), v.index_select(2, self.key_order)
        return chunked_causal_attention(q, k, v, self.query_starts)


@dataclass(frozen=True)
class SequenceShard:
    """This rank's place in the cp group (`rank` of `size`) and the all-gather over it
    (`gather`: (B, heads, T / N, hd) -> (B, heads, T, hd), the ranks' parts in rank order,
    with a backward that sums the gradients of each rank's part back to it). `ring`, when
    given (parallel.cp_impl=torch), is the attention of plain causal layers: q, k, v of this
    rank's chunks (B, heads, T / N, hd) -> its rows (B, n_heads, T / N, hd)."""

    rank: int
    size: int
    gather: Callable[[torch.Tensor], torch.Tensor]
    ring: RingAttention | None = None

    def positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """(local_len,) int64: the global positions of this rank's `local_len` tokens."""
        return head_tail_positions(local_len * self.size, self.rank, self.size, device)

    def attention_mask(self, document_ids: torch.Tensor | None, local_len: int,
                       device: torch.device, dtype: torch.dtype,
                       window: int | None = None) -> ShardedMask:
        """How this rank's `local_len` queries attend over all keys: causally by global
        position; given the whole sequences' `document_ids` (B, T), within documents; given
        a sliding `window`, to the last `window` keys only. Only the last two need a mask
        (in `dtype`)."""
        keys = torch.cat([head_tail_positions(local_len * self.size, rank, self.size, device)
                          for rank in range(self.size)])  # in the order `gather` returns them
        if document_ids is None and window is None:
            if self.ring is not None:
                return ShardedMask(self.gather, None, ring=self.ring)
            starts = tuple(part.start for part in
                           head_tail_chunks(local_len * self.size, self.rank, self.size))
            return ShardedMask(self.gather, None, keys.argsort(), starts)
        queries = self.positions(local_len, device)
        distance = queries[:, None] - keys[None, :]
        mask = ((distance >= 0) & (distance < (window or keys.numel())))[None, None]
        if document_ids is not None:
            same = document_ids[:, queries, None] == document_ids[:, None, keys]
            mask = mask & same[:, None]  # (B, 1, T / N, T)
        additive = torch.zeros(mask.shape, dtype=dtype, device=device)
        return ShardedMask(self.gather, additive.masked_fill_(~mask, float("-inf")))
