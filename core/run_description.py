"""The lines a run starts with: what is trained where, and how the work is laid out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scaleforge.models import count_parameters, num_params
from scaleforge.parallel.pipeline_schedules import theoretical_bubble_fraction

if TYPE_CHECKING:
    from scaleforge.core.trainer import Trainer


def describe_run(trainer: Trainer) -> str:
    """The run's first line: model, parameters, device, precision, batch, run directory."""
    cfg = trainer.cfg
    if trainer.pipeline is not None:  # this rank holds only its stages: count from config
        params, non_embedding = num_params(cfg.model), num_params(cfg.model, False)
    else:  # DTensor parameters report their full size, so this counts the whole model.
        params = count_parameters(trainer.model)
        non_embedding = count_parameters(trainer.model, embeddings=False)
    return (
        f"model {cfg.model.name} ({cfg.model.family}): {params / 1e6:.2f}M parameters "
        f"({non_embedding / 1e6:.2f}M non-embedding) | device {trainer.device} | precision "
        f"{cfg.trainer.precision} | {cfg.trainer.global_batch_tokens:,} tokens/step = "
        f"{trainer.micro_batches} micro-batches x {cfg.trainer.micro_batch_size} x "
        f"{cfg.data.seq_len} | {trainer.throughput.describe()} | "
        f"run dir {trainer.run_dir}"
    )


def describe_layout(trainer: Trainer) -> str:
    """The layout's line: topology, micro-batches per rank, the pipeline's bubble."""
    dims, p = trainer.topology.dims, trainer.cfg.parallel
    line = f"parallel: {trainer.topology.describe()} | per data-parallel rank " \
           f"{trainer.micro_batches} micro-batches"
    if trainer.pipeline is not None:
        bubble = theoretical_bubble_fraction(
            p.pp_schedule, dims.pp, trainer.micro_batches, p.pp_stages_per_rank
        )
        line += (f" | pipeline {p.pp_schedule}, stages {trainer.pipeline.stage_ids} on this "
                 f"rank, theoretical bubble {bubble:.1%}")
    return line
