"""Turn token windows into the (inputs, targets) tensors of a micro-batch
(data_pipeline/batch.py's `Batch` carries them to the training step)."""

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
