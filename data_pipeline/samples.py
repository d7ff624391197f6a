"""Packed windows over memory-mapped token shards, and the blend of several sources.

A source's shards read back to back form one token stream (EOS between documents), cut
into windows of seq_len + 1 tokens with stride seq_len: window k starts at token
k * seq_len, so sequences are packed across document boundaries. Inputs are a window's
first seq_len tokens, targets its last seq_len.

Training reads one endless sample stream. With one source, sample s is window
order(seed, epoch)[s mod n] of that epoch's permutation. With several, a fixed schedule of
BLEND_PERIOD samples gives each source its share of the weights (to within one sample per
period), and each source walks its own epochs. Every sample is found from its index alone
(`BlendedSamples.batch`), so work splits without coordination (data_pipeline/loader.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import torch

from scaleforge.data_pipeline.batch import Batch
from scaleforge.data_pipeline.pack import pack_windows
from scaleforge.errors import ConfigError

BLEND_PERIOD = 1000


class TokenStream:
    """Several token arrays (shards) read as one stream, back to back: shape (len(self),)."""

    def __init__(self, pieces: Sequence[np.ndarray]):
        # Plain ndarray views of the memory maps: slicing an np.memmap costs several times
        # more Python overhead than the copy of a window itself.
        self.pieces = [np.asarray(piece).view(np.ndarray) for piece in pieces if len(piece)]
        self.starts = np.cumsum([0, *(len(piece) for piece in self.pieces)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream; a view when they lie in one piece."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[first])
        if stop <= self.starts[first + 1]:
            return self.pieces[first][offset : offset + stop - start]
        parts, position = [], start
        for index in range(first, len(self.pieces)):
            piece_start = int(self.starts[index])
            parts.append(self.pieces[index][position - piece_start : stop - piece_start])
            position = min(stop, int(self.starts[index + 1]))
            if position == stop:
                break
        return np.concatenate(parts)


class WindowSource(Protocol):
    """What the sample stream reads windows from: `TokenWindows`, or packed conversations
    (data_pipeline/packed_conversations.py)."""

    seq_len: int

    def __len__(self) -> int: ...

    def window(self, k: int) -> np.ndarray:
        """Window k's seq_len + 1 token ids."""
        ...

    def micro_batch(self, window_ids: Iterable[int], eos_id: int | None = None) -> Batch:
        """The windows as one micro-batch."""
        ...


class TokenWindows:
    """The windows of a token stream: window k is tokens[k * seq_len : (k + 1) * seq_len + 1].

    `tokens` is an array (one shard, or a test's synthetic stream) or a TokenStream.
    """

    def __init__(self, tokens: np.ndarray | TokenStream, seq_len: int):
        self.tokens = tokens if isinstance(tokens, TokenStream) else TokenStream([tokens])
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def window(self, k: int) -> np.ndarray:
        """Window k: seq_len + 1 token ids in the stream's dtype."""
        return self.tokens.read(k * self.seq_len, (k + 1) * self.seq_len + 1)

    def batch(self, window_ids: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the given windows: int64, each (len(window_ids), seq_len)."""
        return pack_windows([self.window(int(k)) for k in window_ids])

    def micro_batch(self, window_ids: Iterable[int], eos_id: int | None = None) -> Batch:
        """The windows as one micro-batch, with their document ids (after each `eos_id`)
        when `eos_id` is given."""
        inputs, targets = self.batch(window_ids)
        if eos_id is None:
            return Batch(inputs, targets)
        return Batch(inputs, targets, document_ids(inputs, eos_id))


def _too_short(index: int, source: WindowSource) -> str:
    """The message for a source without a window: with its token count, the largest
    data.seq_len that gives it one among the divisors of the current (a divisor keeps
    trainer.global_batch_tokens a whole number of micro-batches)."""
    seq_len = source.seq_len
    if not isinstance(source, TokenWindows):
        return (f"data source {index} holds fewer than data.seq_len + 1 = {seq_len + 1} "
                "training tokens; add text")
    tokens = len(source.tokens)
    shorter = max((length for length in range(2, seq_len) if seq_len % length == 0
                   and length <= tokens - 1), default=None)
    hint = f"set data.seq_len={shorter}, or add text" if shorter else "add text"
    return (f"data source {index} holds {tokens} training tokens, fewer than data.seq_len + 1 "
            f"= {seq_len + 1}; {hint}")


class BlendedSamples:
    """The endless training sample stream over one or more sources mixed by weight.

    locate(samples) says which source and which window each sample index is; see the
    module docstring for the schedule.
    """

    def __init__(self, sources: Sequence[WindowSource], weights: Sequence[float], seed: int):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        for index, (source, weight) in enumerate(zip(sources, weights, strict=True)):
            if weight <= 0:
                raise ConfigError(f"data.blend[{index}].weight={weight} must be positive")
            if len(source) == 0:
                raise ConfigError(_too_short(index, source))
        self.sources = list(sources)
        self.seed = seed
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self._schedule_sources, self._schedule_ranks, self._per_period = self._schedule()
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        """Samples in one epoch: every window of every source once, for one source; the
        windows of the sources together, for a blend (sources repeat at their own pace)."""
        return sum(len(source) for source in self.sources)

    def realised_mix(self, num_samples: int) -> list[float]:
        """The fraction of the first `num_samples` samples that each source supplies."""
        counts = np.bincount(self.locate(np.arange(num_samples))[0], minlength=len(self.sources))
        return (counts / num_samples).tolist()

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, window id) of each sample index; int64 arrays shaped like samples."""
        if len(self.sources) == 1:
            source = np.zeros_like(samples)
            within = samples
        else:
            period, slot = np.divmod(samples, BLEND_PERIOD)
            source = self._schedule_sources[slot]
            within = period * self._per_period[source] + self._schedule_ranks[slot]
        if len(self.sources) == 1:
            order = self._order
            return source, np.array([order(0, e)[p] for e, p in zip(*np.divmod(
                within, len(self.sources[0])), strict=True)], dtype=np.int64)
        windows = np.empty_like(samples)
        for index in np.unique(source):
            mask = source == index
            epoch, position = np.divmod(within[mask], len(self.sources[index]))
            windows[mask] = [self._order(index, e)[p] for e, p in zip(epoch, position, strict=True)]
        return source, windows

    def batch(self, samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the given sample indices: int64, each (len(samples), seq_len)."""
        source, windows = self.locate(samples)
        if len(self.sources) == 1:
            return pack_windows([self.sources[0].window(int(w)) for w in windows])
        return pack_windows([self.sources[s].window(int(w))
                             for s, w in zip(source, windows, strict=True)])

    def micro_batch(self, samples: np.ndarray, eos_id: int | None = None) -> Batch:
        """The given sample indices as one micro-batch (`batch`, with document ids after each
        `eos_id` when given); one source's own `micro_batch` when there is one source."""
        source, windows = self.locate(samples)
        if len(self.sources) == 1:
            return self.sources[0].micro_batch(windows, eos_id)
        inputs, targets = self.batch(samples)
        if eos_id is None:
            return Batch(inputs, targets)
        return Batch(inputs, targets, document_ids(inputs, eos_id))

    def _schedule(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which source each slot of a period draws from (always the one furthest behind
        its share), the slot's rank among its source's slots, and each source's slots."""
        sources = np.zeros(BLEND_PERIOD, dtype=np.int64)
        ranks = np.zeros(BLEND_PERIOD, dtype=np.int64)
        counts = np.zeros(len(self.sources), dtype=np.int64)
        weights = np.asarray(self.weights)
        for slot in range(BLEND_PERIOD):
            chosen = int(np.argmax(weights * (slot + 1) - counts))
            sources[slot], ranks[slot] = chosen, counts[chosen]
            counts[chosen] += 1
        return sources, ranks, counts

    def _order(self, source: int, epoch: int) -> np.ndarray:
        """The permutation of a source's windows in `epoch`, seeded by (seed, source, epoch);
        a few recent ones are kept, since a micro-batch can straddle an epoch boundary."""
        key = (source, epoch)
        if key not in self._orders:
            if len(self._orders) >= 4 * len(self.sources):
                self._orders.pop(next(iter(self._orders)))
            rng = np.random.default_rng([self.seed, source, epoch])
            self._orders[key] = rng.permutation(len(self.sources[source]))
        return self._orders[key]


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per position, which document of its row it belongs to (0, 1, ...; an EOS belongs to
    the document it ends): int64, shaped like inputs (B, seq_len). Positions with equal ids
    may attend to each other under per-document masking."""
    ends = (inputs == eos_id).long()
    return ends.cumsum(dim=1) - ends
