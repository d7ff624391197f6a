"""The start-of-run log lines: what is trained, how, and on which layout."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scaleforge.core.config import Config
from scaleforge.models import count_parameters, num_params
from scaleforge.parallel.config import ParallelConfig
from scaleforge.parallel.pipeline import Pipeline
from scaleforge.parallel.pipeline_schedules import theoretical_bubble_fraction
from scaleforge.parallel.topology import Topology


def describe_run(cfg: Config, model: nn.Module, pipeline: Pipeline | None, micro_batches: int,
                 throughput: str, run_dir: Path, device: torch.device) -> str:
    """One line: the model and its size, device, precision, the step's tokens split into
    micro-batches, the throughput meter's description and the run directory."""
    if pipeline is not None:  # this rank holds only its stages: count from config
        params, non_embedding = num_params(cfg.model), num_params(cfg.model, False)
    else:  # DTensor parameters report their full size, so this counts the whole model.
        params = count_parameters(model)
        non_embedding = count_parameters(model, embeddings=False)
    return (
        f"model {cfg.model.name} ({cfg.model.family}): {params / 1e6:.2f}M parameters "
        f"({non_embedding / 1e6:.2f}M non-embedding) | device {device} | precision "
        f"{cfg.trainer.precision} | {cfg.trainer.global_batch_tokens:,} tokens/step = "
        f"{micro_batches} micro-batches x {cfg.trainer.micro_batch_size} x "
        f"{cfg.data.seq_len} | {throughput} | run dir {run_dir}"
    )


def describe_layout(topology: Topology, parallel: ParallelConfig, micro_batches: int,
                    pipeline: Pipeline | None) -> str:
    """One line: the layout and mesh, micro-batches per data-parallel rank and, with a
    pipeline, its schedule, this rank's stages and the theoretical bubble."""
    line = (f"parallel: {topology.describe()} | per data-parallel rank {micro_batches} "
            "micro-batches")
    if pipeline is not None:
        bubble = theoretical_bubble_fraction(
            parallel.pp_schedule, topology.dims.pp, micro_batches, parallel.pp_stages_per_rank
        )
        line += (f" | pipeline {parallel.pp_schedule}, stages {pipeline.stage_ids} on this "
                 f"rank, theoretical bubble {bubble:.1%}")
    return line
