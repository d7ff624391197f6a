"""What a context-parallel attention kernel is: an attention kernel (models/attention/) that
wraps a module's own kernel and attends from this rank's chunks of each sequence over the
whole sequence, whose other chunks live on the other ranks of the cp group.

The layout is models/sequence_shard.py's: rank r of N holds chunks r and 2N-1-r of the 2N
chunks of every sequence. Each implementation (`parallel.cp_impl`) is a subclass in a file of
its own with one line in parallel/context_parallel.py's registry; `wrapper(topology)` gives,
once per model, the function that wraps each attention module's kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from scaleforge.models.attention import AttentionKernel
from scaleforge.parallel.topology import Topology


class ContextParallelKernel(AttentionKernel):
    """Attention of this rank's (`rank` of `size`) chunks; `inner` is the module's own kernel
    (its window is this one's)."""

    def __init__(self, inner: AttentionKernel, rank: int, size: int):
        super().__init__(inner.window)
        self.inner, self.rank, self.size = inner, rank, size

    @classmethod
    def wrapper(cls, topology: Topology) -> Callable[[AttentionKernel], AttentionKernel]:
        """kernel -> this implementation around it, over `topology`'s cp group."""
        raise NotImplementedError

    @property
    def mask_key(self) -> Hashable:
        return (type(self), self.window, self.rank, self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r}, rank={self.rank}, size={self.size})"
