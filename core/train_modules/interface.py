"""What the trainer asks of a train module, and what it evaluates on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from scaleforge.data_pipeline.batch import Batch


class ValidationSource(Protocol):
    """What a train module evaluates on (data_pipeline's ValBatches, StreamingBatches): the
    same first `num_batches` micro-batches every call."""

    def batches(self, num_batches: int) -> Iterator[Batch]:
        """This rank's first `num_batches` micro-batches."""
        ...


class TrainModule(Protocol):
    """One optimizer step's forward and backward, and evaluation, on this rank's model."""

    # This rank's model as the modules whose state dicts together make the model's: the
    # whole Transformer, or this rank's pipeline stages (full-model parameter names).
    model_parts: nn.ModuleList

    @property
    def whole_model(self) -> nn.Module | None:
        """The whole model when this rank holds it (to count its parameters); else None."""
        ...

    def step(self, batches: Iterator[Batch]) -> torch.Tensor:
        """Forward and backward over the step's micro-batches from `batches`, gradients
        accumulated; returns this replica's mean loss (a 0-dim device tensor)."""
        ...

    def evaluate(self, source: ValidationSource, eval_batches: int) -> torch.Tensor:
        """Mean loss (0-dim device tensor, equal on every rank) over the first
        `eval_batches` validation micro-batches, shared out over the data-parallel ranks."""
        ...

    def describe(self) -> str:
        """What the start-of-run layout line says about this module ('' when nothing)."""
        ...
