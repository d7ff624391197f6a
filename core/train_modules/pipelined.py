"""The pipelined step: this rank's stages, run by a `torch.distributed.pipelining` schedule."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from scaleforge.core.precision import Precision
from scaleforge.core.train_modules.interface import ValidationSource
from scaleforge.data_pipeline.batch import Batch, step_batch
from scaleforge.parallel.collectives import mean_over_dp_and_cp
from scaleforge.parallel.pipeline import Pipeline, pipeline_eval, pipeline_step
from scaleforge.parallel.pipeline_rules import eval_batches_per_rank
from scaleforge.parallel.pipeline_schedules import theoretical_bubble_fraction
from scaleforge.parallel.topology import Topology


class PipelinedTrainModule:
    """Forward and backward of this rank's pipeline stages (`parallel.build_pipelined_model`
    made them): the schedule runs the step's micro-batches through them. The same contract
    as the plain step: gradients accumulated, the mean loss out on every pp rank; every pp
    rank of a data-parallel replica reads the same micro-batches (only the first stage
    reads inputs, only the last targets)."""

    def __init__(self, pipeline: Pipeline, topology: Topology, precision: Precision,
                 document_masking: bool, columns: Sequence[slice] | None = None):
        self.pipeline = pipeline
        self.model_parts = pipeline.model_parts
        self.topology = topology
        self.precision = precision
        self.document_masking = document_masking
        self.columns = columns  # this cp rank's chunks of each sequence, or None

    @property
    def whole_model(self) -> None:
        """None: this rank holds only its stages."""
        return None

    def step(self, batches: Iterator[Batch]) -> torch.Tensor:
        """One schedule step over the pipeline's micro-batches from `batches`; the mean loss
        (0-dim fp32) on every pp rank."""
        micro_batches = [self._for_schedule(next(batches))
                         for _ in range(self.pipeline.micro_batches)]
        with self.precision.autocast():
            return pipeline_step(self.pipeline, micro_batches)

    @torch.no_grad()
    def evaluate(self, source: ValidationSource, eval_batches: int) -> torch.Tensor:
        """Mean loss over the first `eval_batches` validation micro-batches: this rank's
        share of them in whole schedule rounds (`eval_batches_per_rank`)."""
        per_rank = eval_batches_per_rank(eval_batches, self.topology.dp_size,
                                         self.pipeline.micro_batches)
        batches = [self._for_schedule(batch) for batch in source.batches(per_rank)]
        with self.precision.autocast():
            loss = pipeline_eval(self.pipeline, batches)
        return mean_over_dp_and_cp(self.topology, loss)

    def describe(self) -> str:
        """The schedule, this rank's stages and the schedule's theoretical bubble."""
        p, dims = self.pipeline, self.topology.dims
        stages_per_rank = len(p.stage_ids)
        bubble = theoretical_bubble_fraction(p.schedule_name, dims.pp, p.micro_batches,
                                             stages_per_rank)
        return (f"pipeline {p.schedule_name}, stages {p.stage_ids} on this rank, theoretical "
                f"bubble {bubble:.1%}")

    def _for_schedule(self, batch: Batch) -> Batch:
        # The schedule moves the concatenated micro-batches to the device itself.
        return step_batch(batch, self.document_masking, None, self.columns)
