"""Context parallelism's layout of a sequence: which tokens a cp rank holds.

Under `parallel.cp` = N every sequence of T tokens is cut into 2N chunks of T / 2N tokens,
and rank r of the cp group holds chunks r and 2N-1-r (head and tail), so that every rank
has the same amount of causal attention work: an early chunk's queries see few keys, its
late partner's many. The model runs on the rank's T / N tokens (B, T / N) as on any sequence,
given their global positions (`head_tail_positions`, for RoPE and learned positions); its
attention kernels are wrapped by parallel/ to attend over the whole sequence
(parallel/context_parallel.py).
"""

from __future__ import annotations

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
