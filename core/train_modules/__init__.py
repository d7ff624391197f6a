"""Train modules: how one optimizer step's forward and backward, and an evaluation, run on
this rank's model. The trainer holds one and never asks which (OLMo-core's split):

- `PlainTrainModule` (plain.py): the whole model on this rank (any tp, cp, dp layout);
  micro-batches one after the other with gradient accumulation.
- `PipelinedTrainModule` (pipelined.py): this rank's pipeline stages; a schedule from
  `torch.distributed.pipelining` runs the step's micro-batches through them.

Both take the same micro-batches (every pp rank of a data-parallel replica reads the same
ones), accumulate the same gradients and report the same mean loss; optimizer, clipping,
callbacks and checkpoints only see `model_parts`.
"""

from __future__ import annotations

from collections.abc import Sequence

from scaleforge.core.precision import Precision
from scaleforge.core.train_modules.interface import TrainModule, ValidationSource
from scaleforge.core.train_modules.pipelined import PipelinedTrainModule
from scaleforge.core.train_modules.plain import PlainTrainModule
from scaleforge.parallel.parallelize import BuildPlan, build_model, build_pipelined_model
from scaleforge.parallel.topology import Topology


def build_train_module(plan: BuildPlan, topology: Topology, precision: Precision,
                       document_masking: bool, columns: Sequence[slice] | None) -> TrainModule:
    """The train module of this rank's part of the layout, with its model built (parallel/
    builds, shards and initialises it; call after seeding). `columns`: this cp rank's chunks
    of each sequence (`parallel.context_parallel.batch_columns`)."""
    if topology.dims.pp > 1:
        return PipelinedTrainModule(build_pipelined_model(plan, topology), topology, precision,
                                    document_masking, columns)
    return PlainTrainModule(build_model(plan, topology), topology, precision,
                            plan.micro_batches, document_masking, columns)


__all__ = ["PipelinedTrainModule", "PlainTrainModule", "TrainModule", "ValidationSource",
           "build_train_module"]
