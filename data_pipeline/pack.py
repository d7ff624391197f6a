"""Turn token windows into the (inputs, targets) tensors a training step consumes, and read
a micro-batch's tensors back out (`split_batch`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pack_windows(windows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), int64, each (len(windows), seq_len), from windows of seq_len + 1
    ids. Each is filled straight from the (memory-mapped) windows: one widening copy per
    token and tensor, no intermediate array; this is the loader's hot path."""
    seq_len = len(windows[0]) - 1
    inputs = torch.empty((len(windows), seq_len), dtype=torch.int64)
    targets = torch.empty((len(windows), seq_len), dtype=torch.int64)
    inputs_view, targets_view = inputs.numpy(), targets.numpy()
    for row, window in enumerate(windows):
        inputs_view[row] = window[:-1]
        targets_view[row] = window[1:]
    return inputs, targets


def split_batch(batch: Sequence[torch.Tensor | None], document_masking: bool,
                device: torch.device | None = None, columns: Sequence[slice] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, document ids) of a micro-batch (inputs, targets[, document ids]),
    copied to `device` when given (non_blocking: pinned batches do not wait): the ids are its
    third tensor with `document_masking` (data.document_masking); without it they are None
    and tensors after the targets are ignored. With `columns` (ranges of positions; context
    parallelism: this rank's chunks), inputs and targets keep only those, concatenated in
    order; the document ids stay whole."""
    def moved(tensor: torch.Tensor | None) -> torch.Tensor:
        assert tensor is not None, "inputs, targets and (with masking) document ids"
        return tensor if device is None else tensor.to(device, non_blocking=True)

    def kept(tensor: torch.Tensor | None) -> torch.Tensor:
        whole = moved(tensor)
        return whole if columns is None else torch.cat([whole[:, c] for c in columns], dim=1)

    if not document_masking:
        return kept(batch[0]), kept(batch[1]), None
    if len(batch) < 3 or batch[2] is None:
        raise ValueError(
            "data.document_masking=true but the micro-batches hold no document ids (a third "
            "tensor); build the loaders with the tokenizer's eos_id (data_pipeline.loader "
            "does so from data.document_masking) or set data.document_masking=false"
        )
    return kept(batch[0]), kept(batch[1]), moved(batch[2])


def pin_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`batch` copied into page-locked host memory, so that its copy to the GPU
    (`.to(device, non_blocking=True)`) is queued on the stream instead of waiting for it.
    Needs an accelerator (CUDA)."""
    return tuple(tensor.pin_memory() for tensor in batch)

