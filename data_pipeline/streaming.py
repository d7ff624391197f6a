"""Streaming mode: micro-batches from a Hugging Face IterableDataset, tokenized on the fly.

Each data-parallel rank reads its own part of the dataset (`split_dataset_by_node`), keeps
the documents of the requested split (split.py decides by text, as the shard path does),
tokenizes them, appends EOS and packs the stream into windows of seq_len + 1 tokens with
stride seq_len, exactly as TokenWindows cuts a shard stream: on the same documents in the
same order the two paths yield the same windows. Without random access the ranks read
different documents, so rank r's batches are not the single-process batch i * dp_size + r
(the shard path's guarantee); every document still goes to exactly one rank.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from scaleforge.data_pipeline.batch import Batch
from scaleforge.data_pipeline.pack import pack_windows
from scaleforge.data_pipeline.samples import document_ids
from scaleforge.data_pipeline.sources import read_hf_rows
from scaleforge.data_pipeline.split import (
    LOWEST_DOCUMENTS,
    VAL_WINDOWS_WANTED,
    hash_position,
    is_validation,
    val_fraction_for,
)
from scaleforge.data_pipeline.tokenizer import Tokenizer
from scaleforge.errors import ConfigError

if TYPE_CHECKING:
    from datasets import IterableDataset


class StreamingBatches:
    """Endless micro-batches (inputs, targets), int64, each (micro_batch_size, seq_len), of
    one split of an IterableDataset, for rank `dp_rank` of `dp_size`; with `eos_id`, the
    inputs' document ids follow as a third tensor (samples.document_ids).

    Iterate it for training (epoch after epoch; `dataset.set_epoch` reshuffles a shuffled
    dataset); `batches(n)` restarts from the beginning every call, for validation.
    state_dict() holds the epoch, the rows consumed and the tokens carried into the next
    window, so load_state_dict() resumes at the exact next sample.
    """

    def __init__(self, dataset: IterableDataset, tokenizer: Tokenizer, text_field: str,
                 seq_len: int, micro_batch_size: int, val_fraction: float, split: str = "train",
                 dp_rank: int = 0, dp_size: int = 1, pin_memory: bool = False,
                 eos_id: int | None = None):
        from datasets.distributed import split_dataset_by_node

        self.dataset = split_dataset_by_node(dataset, rank=dp_rank, world_size=dp_size)
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.val_fraction = val_fraction
        self.split = split
        self.pin_memory = pin_memory  # training batches in page-locked memory (for CUDA)
        self.eos_id = eos_id
        self.epoch = 0
        self.rows = 0  # rows of this epoch read so far
        self.carry: list[int] = []  # tokens read but not yet emitted as a whole window
        self._windows: Iterator[np.ndarray] | None = None

    def __iter__(self) -> StreamingBatches:
        return self

    def __next__(self) -> Batch:
        if self._windows is None:
            self._windows = self._endless_windows()
        batch = self._with_documents(pack_windows(
            [next(self._windows) for _ in range(self.micro_batch_size)]
        ))
        return batch.pin_memory() if self.pin_memory else batch

    def _with_documents(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Batch:
        """The batch of (inputs, targets), with the inputs' document ids when `eos_id` is set."""
        inputs, targets = batch
        if self.eos_id is None:
            return Batch(inputs, targets)
        return Batch(inputs, targets, document_ids(inputs, self.eos_id))

    def batches(self, num_batches: int) -> Iterator[Batch]:
        """The first `num_batches` micro-batches of one pass, repeating it when it is short;
        the same every call."""
        windows = list(itertools.islice(self._one_pass([], 0, 0), num_batches *
                                        self.micro_batch_size))
        if not windows:
            advice = (f"set data.val_fraction={self._val_fraction_advice()} (it holds out "
                      f"{VAL_WINDOWS_WANTED} windows), or lower data.seq_len"
                      if self.split == "val" else "give more data")
            raise ConfigError(
                f"data.val_fraction={self.val_fraction}: the streaming {self.split} split "
                f"holds fewer than data.seq_len + 1 = {self.seq_len + 1} tokens; {advice}"
            )
        cycle = itertools.cycle(windows)
        for _ in range(num_batches):
            yield self._with_documents(
                pack_windows([next(cycle) for _ in range(self.micro_batch_size)])
            )

    def _val_fraction_advice(self) -> float:
        """The data.val_fraction that holds out VAL_WINDOWS_WANTED windows of this rank's
        part of the dataset, from one more pass: the tokens of the LOWEST_DOCUMENTS documents
        of lowest hash position (as sf-preprocess shards records them), `val_fraction_for`."""
        documents = 0

        def positions() -> Iterator[tuple[float, str]]:
            nonlocal documents
            for document in read_hf_rows(self.dataset, "data.dataset", self.text_field):
                documents += 1
                yield hash_position(document.text), document.text

        lowest = [[position, len(self.tokenizer.encode(text)) + 1]  # + EOS
                  for position, text in heapq.nsmallest(LOWEST_DOCUMENTS, positions(),
                                                        key=lambda pair: pair[0])]
        mean = sum(tokens for _, tokens in lowest) / max(len(lowest), 1)
        return val_fraction_for(VAL_WINDOWS_WANTED * (self.seq_len + 1) + 1, self.val_fraction,
                                lowest, int(mean * documents), documents)

    def state_dict(self) -> dict:
        """The epoch, rows consumed in it and the carried tokens of the next window."""
        return {"epoch": self.epoch, "rows": self.rows, "carry": list(self.carry)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(); the next batch is the one that followed it."""
        self.epoch, self.rows, self.carry = state["epoch"], state["rows"], list(state["carry"])
        self._windows = None

    def _endless_windows(self) -> Iterator[np.ndarray]:
        while True:
            produced = False
            for window in self._one_pass(self.carry, self.epoch, self.rows, track=True):
                produced = True
                yield window
            if not produced and self.rows == 0:
                raise ConfigError(
                    f"the streaming {self.split} split of data.dataset holds fewer than "
                    f"data.seq_len + 1 = {self.seq_len + 1} tokens; give more data"
                )
            self.epoch, self.rows = self.epoch + 1, 0

    def _one_pass(self, carry: list[int], epoch: int, skip_rows: int,
                  track: bool = False) -> Iterator[np.ndarray]:
        """Windows of one epoch from row `skip_rows` on, `carry` tokens first. With `track`,
        self.rows and self.carry follow each window, so state_dict() is always current."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        buffer = list(carry)
        rows = itertools.islice(self.dataset, skip_rows, None)
        for number, document in enumerate(read_hf_rows(rows, "data.dataset", self.text_field),
                                          start=skip_rows + 1):
            if is_validation(document.text, self.val_fraction) == (self.split == "train"):
                continue
            buffer += self.tokenizer.encode(document.text)
            buffer.append(self.tokenizer.eos_id)
            while len(buffer) >= self.seq_len + 1:
                window = np.asarray(buffer[: self.seq_len + 1], dtype=np.int64)
                buffer = buffer[self.seq_len :]
                if track:
                    self.rows, self.carry = number, buffer
                yield window
            if track:
                self.rows, self.carry = number, buffer

