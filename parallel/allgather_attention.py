"""Context-parallel attention by all-gathering keys and values (`parallel.cp_impl=allgather`,
Llama 3's design): this rank's queries (B, n_heads, T / N, hd) attend over the keys and
values of all T tokens, gathered from the cp group (`gather_sequence`: forward all-gather in
rank order, backward reduce-scatter). Any device, every mask.

Plain causal attention needs no mask: each query chunk attends to the keys before it in full
and to its own chunk causally (models/chunked_attention.py), after the gathered keys are put
in sequence order. With documents or a sliding window, a mask of this rank's queries over all
keys (in the gathered rank order) is built from the global positions of queries and keys, the
whole sequence's document ids and the window, additive in the activations' dtype (SDPA would
turn a boolean one into a float copy in every layer and keep each for backward).

Memory: that mask is T / N x T per micro-batch (32 MiB at 4,096 tokens and cp 2 in fp32;
1 GiB at 128k tokens and cp 16 in bf16), which is why plain causal attention does without.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

from scaleforge.models.attention import AttentionKernel, Supports
from scaleforge.models.chunked_attention import chunked_causal_attention
from scaleforge.models.sequence_shard import head_tail_chunks, head_tail_positions
from scaleforge.parallel.cp_attention import ContextParallelKernel
from scaleforge.parallel.sequence_collectives import gather_sequence
from scaleforge.parallel.topology import Topology


class GatheredKeysMask(NamedTuple):
    """Either the additive mask (B or 1, 1, T / N, T) of this rank's queries over the
    gathered keys (0: attend, -inf: not), or, for plain causal attention, no mask and the
    order (T,) that puts the gathered keys in sequence order, with the global starts of this
    rank's two query chunks."""

    mask: torch.Tensor | None
    key_order: torch.Tensor | None = None
    query_starts: tuple[int, ...] = ()


class AllGatherKernel(ContextParallelKernel):
    """`gather`: (B, heads, T / N, hd) -> (B, heads, T, hd), the ranks' parts in rank order,
    with a backward that sums the gradients of each rank's part back to it."""

    name = "allgather"
    supports = Supports(context_parallel=True)

    def __init__(self, inner: AttentionKernel, rank: int, size: int,
                 gather: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(inner, rank, size)
        self.gather = gather

    @classmethod
    def wrapper(cls, topology: Topology) -> Callable[[AttentionKernel], AttentionKernel]:
        gather = partial(gather_sequence, group=topology.group("cp"))
        return partial(cls, rank=topology.coordinates["cp"], size=topology.dims.cp,
                       gather=gather)

    def mask(self, document_ids: torch.Tensor | None, seq_len: int, device: torch.device,
             dtype: torch.dtype) -> GatheredKeysMask:
        """How this rank's `seq_len` queries attend over all keys: causally by global
        position; given the whole sequences' `document_ids` (B, T), within documents; with
        a sliding window, to the last `window` keys only. Only the last two need a mask."""
        total = seq_len * self.size
        keys = torch.cat([head_tail_positions(total, rank, self.size, device)
                          for rank in range(self.size)])  # in the order `gather` returns them
        if document_ids is None and self.window is None:
            starts = tuple(part.start for part in head_tail_chunks(total, self.rank, self.size))
            return GatheredKeysMask(None, keys.argsort(), starts)
        queries = head_tail_positions(total, self.rank, self.size, device)
        distance = queries[:, None] - keys[None, :]
        mask = ((distance >= 0) & (distance < (self.window or total)))[None, None]
        if document_ids is not None:
            same = document_ids[:, queries, None] == document_ids[:, None, keys]
            mask = mask & same[:, None]  # (B, 1, T / N, T)
        additive = torch.zeros(mask.shape, dtype=dtype, device=device)
        return GatheredKeysMask(additive.masked_fill_(~mask, float("-inf")))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: GatheredKeysMask) -> torch.Tensor:
        """This rank's q (B, n_heads, T / N, hd) over every rank's keys and values (k, v
        (B, n_kv_heads, T / N, hd) here); returns (B, n_heads, T / N, hd)."""
        k, v = self.gather(k), self.gather(v)  # (B, n_kv_heads, T, hd), in rank order
        if mask.mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, enable_gqa=True)
        assert mask.key_order is not None, "plain causal attention puts the keys in order"
        k, v = k.index_select(2, mask.key_order), v.index_select(2, mask.key_order)
        return chunked_causal_attention(q, k, v, mask.query_starts)
