"""The plain step: the whole model on this rank, micro-batches one after the other."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from scaleforge.core.precision import Precision
from scaleforge.core.train_modules.interface import ValidationSource
from scaleforge.data_pipeline.batch import Batch, step_batch
from scaleforge.models.transformer import Transformer
from scaleforge.parallel.collectives import sum_over_tokens
from scaleforge.parallel.data_parallel import set_gradient_reduction
from scaleforge.parallel.topology import Topology


class PlainTrainModule:
    """Forward and backward of a model that is whole on this rank (any tp, cp and dp layout;
    `parallel.build_model` made it), with `micro_batches` steps of gradient accumulation."""

    def __init__(self, model: Transformer, topology: Topology, precision: Precision,
                 micro_batches: int, document_masking: bool,
                 columns: Sequence[slice] | None = None):
        self.model = model
        self.model_parts = nn.ModuleList([model])
        self.topology = topology
        self.precision = precision
        self.micro_batches = micro_batches
        self.document_masking = document_masking
        self.columns = columns  # this cp rank's chunks of each sequence, or None

    @property
    def whole_model(self) -> nn.Module:
        """The model (this rank holds all of its layers)."""
        return self.model

    def step(self, batches: Iterator[Batch]) -> torch.Tensor:
        """Forward and backward over this step's micro-batches, accumulating gradients.

        Returns the sum over micro-batches of loss / micro_batches (this replica's mean loss,
        a plain device tensor). Under FSDP every micro-batch's backward reduce-scatters its
        gradients, which accumulate sharded; the all-reduce across dp_replicate runs with the
        last (parallel/data_parallel.py). The loss is `Transformer.loss`: the logits go
        straight into it, and it reuses them as the buffer of their gradient (models/loss.py).
        """
        scaler = self.precision.scaler
        total_loss = torch.zeros((), device=self.topology.device)
        for index in range(self.micro_batches):
            batch = self._on_device(next(batches))
            set_gradient_reduction(self.model, index == self.micro_batches - 1)
            with self.precision.autocast():
                loss = self._loss(batch) / self.micro_batches
            (scaler.scale(loss) if scaler else loss).backward()
            total_loss += loss.detach()
        return total_loss

    @torch.no_grad()
    def evaluate(self, source: ValidationSource, eval_batches: int) -> torch.Tensor:
        """Mean loss over the first `eval_batches` validation micro-batches, micro-batch i on
        data-parallel rank i mod dp_size (the number one process computes)."""
        dp_size, dp_rank = self.topology.dp_size, self.topology.dp_rank
        # Every rank runs the same number of forwards (FSDP's gathers are collective);
        # batches past eval_batches are run but not counted.
        per_rank = -(-eval_batches // dp_size)
        losses = []
        for index, batch in enumerate(source.batches(per_rank)):
            with self.precision.autocast():
                loss = self._loss(self._on_device(batch))
            if index * dp_size + dp_rank < eval_batches:
                losses.append(loss)
        local = (torch.stack(losses).sum() if losses
                 else torch.zeros((), device=self.topology.device))
        # Each cp rank's losses are its chunks' means: a replica's are their mean over cp.
        total = sum_over_tokens(self.topology, local) / self.topology.dims.cp
        return total / eval_batches

    def describe(self) -> str:
        """Nothing beyond the layout: ''."""
        return ""

    def _on_device(self, batch: Batch) -> Batch:
        return step_batch(batch, self.document_masking, self.topology.device, self.columns)

    def _loss(self, batch: Batch) -> torch.Tensor:
        return self.model.loss(batch.inputs, batch.targets, batch.document_ids)
