"""Context parallelism as the model sees it: this rank holds two of each sequence's chunks.

Under `parallel.cp` = N every sequence of T tokens is cut into 2N chunks of T / 2N tokens,
and rank r of the cp group holds chunks r and 2N-1-r (head and tail), so that every rank
has the same amount of causal attention work: an early chunk's queries see few keys, its
late partner's many. The model then runs on the rank's T / N tokens (B, T / N) as on any
sequence, except at two places:
- positions: RoPE (and GPT's learned positions) use each token's global position
  (`SequenceShard.positions`);
- attention: the queries of the rank's tokens attend over the keys and values of all T
  tokens, gathered from the cp group (`SequenceShard.gather`, supplied by parallel/), under
  a causal mask built from the global positions of queries and keys, and from the whole
  sequence's document ids when documents are masked (`SequenceShard.attention_mask`).

The gathered keys are in rank order (rank 0's two chunks, then rank 1's, ...), not sequence
order: the mask follows them, so no reordering copy is made (putting them back in order
was measured not to bring the numbers closer to one process's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


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


class ShardedMask(NamedTuple):
    """What each attention layer gets under context parallelism: the additive mask (B or 1,
    1, T / N, T) of this rank's queries over the gathered keys (0: attend, -inf: not), and
    the function that gathers keys or values (B, kv heads, T / N, hd) -> (B, kv heads, T,
    hd). The mask is in the queries' dtype, made once per forward: SDPA would turn a boolean
    one into a float copy in every layer and keep each for backward (measured: 4x the
    memory of one mask in a 4-layer model)."""

    mask: torch.Tensor
    gather: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SequenceShard:
    """This rank's place in the cp group (`rank` of `size`) and the all-gather over it
    (`gather`: (B, heads, T / N, hd) -> (B, heads, T, hd), the ranks' parts in rank order,
    with a backward that sums the gradients of each rank's part back to it)."""

    rank: int
    size: int
    gather: Callable[[torch.Tensor], torch.Tensor]

    def positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """(local_len,) int64: the global positions of this rank's `local_len` tokens."""
        return head_tail_positions(local_len * self.size, self.rank, self.size, device)

    def attention_mask(self, document_ids: torch.Tensor | None, local_len: int,
                       device: torch.device, dtype: torch.dtype) -> ShardedMask:
        """The mask (in `dtype`) of this rank's `local_len` queries over all keys: causal by
        global position and, given the whole sequences' `document_ids` (B, T), within
        documents."""
        queries = self.positions(local_len, device)
        keys = torch.cat([head_tail_positions(local_len * self.size, rank, self.size, device)
                          for rank in range(self.size)])  # in the order `gather` returns them
        mask = (queries[:, None] >= keys[None, :])[None, None]  # (1, 1, T / N, T)
        if document_ids is not None:
            same = document_ids[:, queries, None] == document_ids[:, None, keys]
            mask = mask & same[:, None]  # (B, 1, T / N, T)
        additive = torch.zeros(mask.shape, dtype=dtype, device=device)
        return ShardedMask(additive.masked_fill_(~mask, float("-inf")), self.gather)
