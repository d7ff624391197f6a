"""Pipeline schedules as configuration: which schedules exist, how each places stages on
ranks, the rules a layout must meet (checked before any process group exists) and the
theoretical bubble of each. Nothing here runs a pipeline; parallel/pipeline.py does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed.pipelining import schedules as torch_schedules

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig

Layout = Literal["loop", "v"]

# The config setting that carries an explicit per-stage layer list, named in errors.
LAYERS_PER_STAGE_SETTING = "parallel.pp_layers_per_stage"


@dataclass(frozen=True)
class ScheduleSpec:
    """How a schedule places stages: its torch class, one or several stages per rank, layout,
    and whether it splits backward into input- and weight-gradient passes (zero bubble)."""

    torch_class: str
    multi_stage: bool
    layout: Layout
    splits_backward: bool = False


SCHEDULES: dict[str, ScheduleSpec] = {
    "GPipe": ScheduleSpec("ScheduleGPipe", multi_stage=False, layout="loop"),
    "1F1B": ScheduleSpec("Schedule1F1B", multi_stage=False, layout="loop"),
    "Interleaved1F1B": ScheduleSpec("ScheduleInterleaved1F1B", multi_stage=True, layout="loop"),
    "InterleavedZeroBubble": ScheduleSpec(
        "ScheduleInterleavedZeroBubble", multi_stage=True, layout="loop", splits_backward=True
    ),
    "ZBVZeroBubble": ScheduleSpec(
        "ScheduleZBVZeroBubble", multi_stage=True, layout="v", splits_backward=True
    ),
    "DualPipeV": ScheduleSpec(
        "ScheduleDualPipeV", multi_stage=True, layout="v", splits_backward=True
    ),
}


def available_schedules() -> tuple[str, ...]:
    """Names of the schedules in SCHEDULES that this torch build provides."""
    return tuple(n for n, s in SCHEDULES.items() if hasattr(torch_schedules, s.torch_class))


def schedule_spec(schedule: str) -> ScheduleSpec:
    """The ScheduleSpec of `schedule`; ConfigError naming `parallel.pp_schedule` if it is
    unknown or missing from the installed torch."""
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"parallel.pp_schedule={schedule!r} is unknown; use one of "
            f"{', '.join(available_schedules())}"
        )
    spec = SCHEDULES[schedule]
    if not hasattr(torch_schedules, spec.torch_class):
        raise ConfigError(
            f"parallel.pp_schedule={schedule!r} is not available in torch {torch.__version__} "
            f"(no torch.distributed.pipelining.{spec.torch_class}); use one of "
            f"{', '.join(available_schedules())} or upgrade torch"
        )
    return spec


def check_stages_per_rank(schedule: str, spec: ScheduleSpec, stages_per_rank: int) -> None:
    """ConfigError unless `schedule` can run `stages_per_rank` stages on each rank."""
    if stages_per_rank < 1:
        raise ConfigError(f"parallel.pp_stages_per_rank={stages_per_rank} must be at least 1")
    if not spec.multi_stage and stages_per_rank != 1:
        raise ConfigError(
            f"parallel.pp_schedule={schedule!r} runs one stage per rank but "
            f"parallel.pp_stages_per_rank={stages_per_rank}; set parallel.pp_stages_per_rank=1 "
            "or pick a multi-stage schedule (Interleaved1F1B, InterleavedZeroBubble, "
            "ZBVZeroBubble, DualPipeV)"
        )
    if spec.layout == "v" and stages_per_rank != 2:
        raise ConfigError(
            f"parallel.pp_schedule={schedule!r} needs exactly 2 stages per rank (V layout) but "
            f"parallel.pp_stages_per_rank={stages_per_rank}; set parallel.pp_stages_per_rank=2"
        )
    if spec.multi_stage and stages_per_rank < 2:
        raise ConfigError(
            f"parallel.pp_schedule={schedule!r} interleaves several stages per rank but "
            f"parallel.pp_stages_per_rank={stages_per_rank}; set parallel.pp_stages_per_rank "
            "to 2 or more, or use GPipe or 1F1B for one stage per rank"
        )


def stage_indices(pp_rank: int, pp: int, stages_per_rank: int, layout: Layout) -> list[int]:
    """Global stage indices (0 = embeddings side) run by pipeline rank `pp_rank`, in order.

    loop: r, r+p, ..., r+(v-1)p.  v: r and 2p-1-r (stages_per_rank must be 2).
    """
    if layout == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def stage_layer_ranges(
    n_layers: int, num_stages: int, layers_per_stage: Sequence[int] | None = None
) -> list[range]:
    """The contiguous range of layer indices owned by each of `num_stages` stages.

    Balancing rule: without an explicit list every stage gets n_layers / num_stages layers,
    which must divide exactly (embeddings and head ride on the first and last stage; to give
    those stages fewer layers, pass `layers_per_stage`, e.g. [1, 2, 2, 1]). An explicit list
    needs one entry >= 1 per stage summing to n_layers.
    """
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if len(counts) != num_stages or sum(counts) != n_layers or min(counts) < 1:
            raise ConfigError(
                f"{LAYERS_PER_STAGE_SETTING}={counts} must have one entry >= 1 per stage "
                f"(parallel.pp x parallel.pp_stages_per_rank = {num_stages} stages) summing to "
                f"model.n_layers={n_layers}"
            )
    else:
        if n_layers < num_stages:
            raise ConfigError(
                f"model.n_layers={n_layers} is fewer than the {num_stages} pipeline stages "
                f"(parallel.pp x parallel.pp_stages_per_rank) and each stage needs a layer; "
                f"set model.n_layers={num_stages}, or lower parallel.pp or "
                "parallel.pp_stages_per_rank"
            )
        if n_layers % num_stages:
            split = ",".join(map(str, _uneven_split(n_layers, num_stages)))
            raise ConfigError(
                f"model.n_layers={n_layers} is not divisible by the {num_stages} pipeline "
                f"stages (parallel.pp x parallel.pp_stages_per_rank); set "
                f"{LAYERS_PER_STAGE_SETTING}=[{split}]"
            )
        counts = [n_layers // num_stages] * num_stages
    starts = [sum(counts[:i]) for i in range(num_stages)]
    return [range(start, start + count) for start, count in zip(starts, counts, strict=True)]


def _uneven_split(n_layers: int, num_stages: int) -> list[int]:
    """Layers per stage as even as they go, the extra layers on the middle stages first (the
    first holds the embedding, the last the head)."""
    counts = [n_layers // num_stages] * num_stages
    middle_first = [*range(1, num_stages - 1), 0, num_stages - 1]
    for stage in middle_first[:n_layers % num_stages]:
        counts[stage] += 1
    return counts


def check_micro_batches(schedule: str, pp: int, stages_per_rank: int, micro_batches: int,
                        tokens_per_micro_batch: int | None = None) -> None:
    """ConfigError unless `micro_batches` per step can feed the schedule: at least one per
    stage (one per rank for Interleaved1F1B), and for the interleaved schedules a multiple of
    torch's number of rounds. With `tokens_per_micro_batch` (trainer.micro_batch_size x
    data.seq_len x data-parallel size) too few micro-batches get the global batch that
    gives enough."""
    # torch's Interleaved1F1B needs only whole rounds (below); with fewer micro-batches than
    # ranks a round leaves ranks without work, so we ask for at least one per rank, as
    # Megatron does. The others need one per stage (torch checks 1F1B and DualPipeV so).
    if schedule == "Interleaved1F1B":
        needed, what = pp, f"{pp} pipeline ranks (parallel.pp)"
    else:
        needed = pp * stages_per_rank
        what = f"{needed} pipeline stages (parallel.pp x parallel.pp_stages_per_rank)"
    if micro_batches < needed:
        raise ConfigError(
            f"{micro_batches} micro-batch{'' if micro_batches == 1 else 'es'} per step "
            f"(trainer.global_batch_tokens / (trainer.micro_batch_size x data.seq_len x "
            f"data-parallel size)) {'is' if micro_batches == 1 else 'are'} fewer than the "
            f"{what}; " + (f"set trainer.global_batch_tokens={needed * tokens_per_micro_batch}"
                           if tokens_per_micro_batch else
                           "raise trainer.global_batch_tokens, lower trainer.micro_batch_size "
                           "or lower parallel.pp")
        )
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        # torch's rule: the micro-batches run in max(1, m // pp) rounds of equal size.
        rounds = max(1, micro_batches // pp)
        whole = -(-micro_batches // pp) * pp  # the next multiple of pp: rounds of pp each
        if micro_batches % rounds:
            raise ConfigError(
                f"parallel.pp_schedule={schedule!r} runs the micro-batches per step "
                f"({micro_batches}) in max(1, {micro_batches} // parallel.pp) = {rounds} rounds "
                f"of equal size, and {rounds} does not divide {micro_batches}; " + (
                    f"set trainer.global_batch_tokens={whole * tokens_per_micro_batch} "
                    f"({whole} micro-batches, a multiple of the {pp} pipeline ranks)"
                    if tokens_per_micro_batch else
                    f"make the micro-batch count a multiple of the {pp} pipeline ranks "
                    f"(e.g. {whole}) through trainer.global_batch_tokens")
            )


def check_tied_embeddings(model_cfg: TransformerConfig, pp: int, layout: Layout) -> None:
    """Reject tied input/output embeddings when the first and last stage sit on different
    ranks: the shared weight would get two diverging copies. The V layout keeps both ends on
    rank 0, where the two stages share one Parameter, so ties are fine there."""
    if model_cfg.tie_embeddings and pp > 1 and layout == "loop":
        raise ConfigError(
            f"model.tie_embeddings=true with parallel.pp={pp}: the token embedding (first "
            "stage) and the LM head (last stage) would live on different pipeline ranks; set "
            "model.tie_embeddings=false, or use a V-layout schedule (ZBVZeroBubble, DualPipeV) "
            "that keeps both on rank 0"
        )


def validate_pipeline(
    model_cfg: TransformerConfig,
    pp: int,
    schedule: str,
    stages_per_rank: int,
    micro_batches: int,
    layers_per_stage: Sequence[int] | None = None,
    tokens_per_micro_batch: int | None = None,
) -> None:
    """Every pipeline rule, checked before any process group exists; raises ConfigError
    naming the setting, its value and the fix (`tokens_per_micro_batch`: see
    `check_micro_batches`)."""
    if pp < 1:
        raise ConfigError(f"parallel.pp={pp} must be at least 1")
    spec = schedule_spec(schedule)
    check_stages_per_rank(schedule, spec, stages_per_rank)
    stage_layer_ranges(model_cfg.n_layers, pp * stages_per_rank, layers_per_stage)
    check_micro_batches(schedule, pp, stages_per_rank, micro_batches, tokens_per_micro_batch)
    check_tied_embeddings(model_cfg, pp, spec.layout)


def theoretical_bubble_fraction(
    schedule: str, pp: int, microbatches: int, stages_per_rank: int = 1
) -> float:
    """Fraction of a step each rank spends idle, ideal compute and zero-cost communication.

    p = pp, m = microbatches, v = stages_per_rank.
    - GPipe, 1F1B: (p-1) / (m+p-1)  (GPipe, Huang et al. 2019; PipeDream-Flush).
    - Interleaved1F1B: (p-1) / (v*m + p-1)  (Narayanan et al. 2021, sec. 2.2.2: the bubble
      shrinks by v).
    - Zero-bubble family, assuming forward F = backward-for-input B = backward-for-weights W
      per stage chunk (the assumption of Qi et al. 2023, arXiv 2401.10241). A rank's work
      is 3*v*m chunk units; the bubbles come from DeepSeek-V3's report (arXiv 2412.19437,
      Table 2), with B_full = B + W:
      InterleavedZeroBubble (ZB1P): (p-1)(F + B_full - 2W) = (p-1) units
        -> (p-1) / (3*v*m + p-1).
      DualPipeV, on p ranks = DualPipe with 2p stages: (p-1)(F&B + B_full - 3W) with no
        F&B overlap gain (F&B = F + B_full) = 2(p-1) units -> 2(p-1) / (3*v*m + 2(p-1)).
      ZBVZeroBubble: 0 when F = B = W (Qi et al. 2023, section 6, ZB-V).
    """
    if pp < 1 or microbatches < 1 or stages_per_rank < 1:
        raise ValueError(
            f"pp={pp}, microbatches={microbatches}, stages_per_rank={stages_per_rank} must "
            "all be at least 1"
        )
    p, m, v = pp, microbatches, stages_per_rank
    if schedule in ("GPipe", "1F1B"):
        return (p - 1) / (m + p - 1)
    if schedule == "Interleaved1F1B":
        return (p - 1) / (v * m + p - 1)
    if schedule == "InterleavedZeroBubble":
        return (p - 1) / (3 * v * m + p - 1)
    if schedule == "DualPipeV":
        return 2 * (p - 1) / (3 * v * m + 2 * (p - 1))
    if schedule == "ZBVZeroBubble":
        return 0.0
    raise ConfigError(
        f"parallel.pp_schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}"
    )
