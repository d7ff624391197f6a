"""Conversations packed whole into training windows, with the loss on assistant tokens only.

The shards of `sf-preprocess sft` (data_pipeline/conversation_shards.py) hold one
conversation per document and a trained flag per token. Here the conversations, in shard
order, are packed next-fit into windows of seq_len + 1 tokens: a conversation goes into the
current window when it fits, else it opens the next one, and the rest of a window is padding
(EOS ids, never trained). So no conversation is cut at a window boundary, and the packing
depends on the shards and seq_len only (the epoch's shuffle then orders the windows, as for
pretraining: data_pipeline/samples.py). A conversation longer than the window is dropped or
cut to its first seq_len + 1 tokens (`data.sft.overlong`), and counted.

A window's micro-batch row: inputs its first seq_len tokens, targets its last seq_len with
IGNORE_INDEX wherever the target token is not trained (prompts, system turns, template
markers, padding), and document ids numbering its conversations (the padding one more), so
that with data.document_masking no conversation attends to another and with
model.rope_per_document each starts at position 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from scaleforge.data_pipeline.batch import IGNORE_INDEX, Batch
from scaleforge.data_pipeline.samples import TokenStream
from scaleforge.errors import check_choice

OVERLONG_CHOICES = ("drop", "truncate")


@dataclass(frozen=True)
class PackingReport:
    """What packing did with a split's conversations."""

    conversations: int
    windows: int
    dropped: int  # longer than the window, left out (overlong=drop)
    truncated: int  # longer than the window, cut (overlong=truncate)
    fill: float  # share of the windows' tokens that are conversation, not padding

    def describe(self, split: str, seq_len: int) -> str:
        """One line, e.g. `train: 1,200 conversations in 310 windows of 257 tokens (93.1%
        filled); 4 longer than the window dropped (data.sft.overlong=drop)`."""
        line = (f"{split}: {self.conversations:,} conversations in {self.windows:,} windows of "
                f"{seq_len + 1} tokens ({self.fill:.1%} filled)")
        if self.dropped:
            line += (f"; {self.dropped:,} longer than the window dropped "
                     "(data.sft.overlong=drop)")
        if self.truncated:
            line += (f"; {self.truncated:,} longer than the window truncated "
                     "(data.sft.overlong=truncate)")
        return line


class PackedConversations:
    """The packed windows of one split: `len()` windows, each `micro_batch` row one window.

    tokens, masks: the split's shards (token ids; uint8 trained flags, one per token);
    document_offsets: int64 (num_conversations + 1,) offsets into the concatenated stream.
    """

    def __init__(self, tokens: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                 document_offsets: np.ndarray, seq_len: int, overlong: str, eos_id: int):
        check_choice("data.sft.overlong", overlong, OVERLONG_CHOICES)
        self.tokens = TokenStream(tokens)
        self.masks = TokenStream(masks)
        self.seq_len = seq_len
        self.eos_id = eos_id
        capacity = seq_len + 1
        starts = np.asarray(document_offsets[:-1], dtype=np.int64)
        lengths = np.diff(np.asarray(document_offsets, dtype=np.int64))
        too_long = lengths > capacity
        keep = ~too_long if overlong == "drop" else np.ones_like(too_long)
        self.starts = starts[keep]
        self.lengths = np.minimum(lengths[keep], capacity)
        # window k holds kept conversations first[k] .. first[k + 1] - 1
        self.first = _next_fit(self.lengths, capacity)
        windows = len(self.first) - 1
        self.report = PackingReport(
            conversations=int(len(lengths)), windows=windows,
            dropped=int(too_long.sum()) if overlong == "drop" else 0,
            truncated=int(too_long.sum()) if overlong == "truncate" else 0,
            fill=float(self.lengths.sum() / max(1, windows * capacity)),
        )

    def __len__(self) -> int:
        return len(self.first) - 1

    def window_arrays(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Window k's (token ids int64, trained flags bool, document ids int64), each of
        seq_len + 1 entries; the padding after the last conversation is EOS, untrained, and
        a document of its own."""
        capacity = self.seq_len + 1
        tokens = np.full(capacity, self.eos_id, dtype=np.int64)
        trained = np.zeros(capacity, dtype=bool)
        documents = np.full(capacity, self.first[k + 1] - self.first[k], dtype=np.int64)
        position = 0
        for index, conversation in enumerate(range(self.first[k], self.first[k + 1])):
            start, length = int(self.starts[conversation]), int(self.lengths[conversation])
            span = slice(position, position + length)
            tokens[span] = self.tokens.read(start, start + length)
            trained[span] = self.masks.read(start, start + length) != 0
            documents[span] = index
            position += length
        return tokens, trained, documents

    def window(self, k: int) -> np.ndarray:
        """Window k's seq_len + 1 token ids."""
        return self.window_arrays(k)[0]

    def micro_batch(self, window_ids: Iterable[int], eos_id: int | None = None) -> Batch:
        """The windows as one micro-batch: inputs, targets (IGNORE_INDEX where not trained)
        and document ids, each (len(window_ids), seq_len) int64. `eos_id` is not used: the
        documents are the packed conversations, whatever tokens they hold."""
        rows = [self.window_arrays(int(k)) for k in window_ids]
        tokens = torch.from_numpy(np.stack([row[0] for row in rows]))
        trained = torch.from_numpy(np.stack([row[1] for row in rows]))
        documents = torch.from_numpy(np.stack([row[2] for row in rows]))
        targets = torch.where(trained[:, 1:], tokens[:, 1:], IGNORE_INDEX)
        return Batch(tokens[:, :-1].contiguous(), targets, documents[:, :-1].contiguous())


def _next_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Window boundaries (num_windows + 1,) over conversations of `lengths` (each at most
    `capacity`), packed in order: a conversation that does not fit opens the next window."""
    first = [0]
    fill = 0
    for index, length in enumerate(lengths.tolist()):
        if fill + length > capacity:
            first.append(index)
            fill = 0
        fill += length
    if fill:
        first.append(len(lengths))
    return np.asarray(first, dtype=np.int64)
