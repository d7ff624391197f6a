"""The pipeline's rules on the rest of the run: which schedules go with tensor parallelism,
activation checkpointing and FSDP, tied embeddings under sharding, and evaluation in whole
schedule rounds. Checked by `core.config.validate` before any process group exists; the
pipeline's own rules (stages, layers, micro-batches) are `validate_pipeline`'s."""

from __future__ import annotations

from scaleforge.errors import ConfigError, ErrorCollector
from scaleforge.models.config import TransformerConfig
from scaleforge.parallel.config import ParallelConfig
from scaleforge.parallel.pipeline_schedules import SCHEDULES, validate_pipeline
from scaleforge.parallel.topology import ParallelDims


def check_pipeline_layout(model: TransformerConfig, parallel: ParallelConfig,
                          dims: ParallelDims, micro_batches: int, activation_checkpointing: str,
                          eval_batches: int, tokens_per_micro_batch: int | None = None) -> None:
    """Every rule of a pipelined run (parallel.pp > 1) in the layout `dims` with
    `micro_batches` per step: `validate_pipeline`'s, then the layout's: zero-bubble
    schedules need stages without tensor parallelism, selective checkpointing or FSDP
    resharding after forward; tied embeddings need neither tp nor dp; evaluation runs whole
    schedule rounds on every data-parallel rank (`eval_batches_per_rank`). The evaluation
    rule is reported together with the others (errors.ConfigErrors), so following a first
    hint does not lead to a second error."""
    problems = ErrorCollector()
    problems.run(_check_schedule_layout, model, parallel, dims, micro_batches,
                 activation_checkpointing, tokens_per_micro_batch)
    problems.run(eval_batches_per_rank, eval_batches, dims.dp_size, micro_batches, dims.pp)
    problems.raise_if_any()


def _check_schedule_layout(model: TransformerConfig, parallel: ParallelConfig,
                           dims: ParallelDims, micro_batches: int,
                           activation_checkpointing: str,
                           tokens_per_micro_batch: int | None) -> None:
    p = parallel
    tp, dp_size, dp_shard = dims.tp, dims.dp_size, dims.dp_shard
    validate_pipeline(model, dims.pp, p.pp_schedule, p.pp_stages_per_rank, micro_batches,
                      p.pp_layers_per_stage, tokens_per_micro_batch)
    splits_backward = SCHEDULES[p.pp_schedule].splits_backward
    if tp > 1 and splits_backward:
        # torch's input-only backward (stage_backward_input) fails on DTensor stages.
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule!r} with parallel.tp={tp}: zero-bubble "
            "schedules split each backward into input- and weight-gradient passes, which "
            "torch cannot run on tensor-parallel stages; use GPipe, 1F1B or Interleaved1F1B "
            "with tensor parallelism, or set parallel.tp=1"
        )
    if splits_backward and activation_checkpointing == "selective":
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule!r} with trainer.activation_checkpointing="
            "selective: a zero-bubble schedule runs two backward passes (input, then weight "
            "gradients) over each block, which selective checkpointing forbids; use "
            "trainer.activation_checkpointing=full or none, or GPipe, 1F1B or Interleaved1F1B"
        )
    if model.tie_embeddings and (tp > 1 or dp_size > 1):
        # Each stage is sharded on its own, so the two stages' copies of the tied weight
        # would become two separate shards, updated apart.
        raise ConfigError(
            f"model.tie_embeddings=true with parallel.pp={dims.pp} and tensor or data parallelism "
            f"(tp={tp}, {dp_size} data-parallel ranks): rank 0's first and last stages are "
            "sharded separately and would hold two diverging copies of the tied weight; set "
            "model.tie_embeddings=false, or run the pipeline without tp and dp"
        )
    if splits_backward and dp_shard > 1 and p.fsdp_reshard_after_forward:
        # Measured: weights off by 5e-3 after 3 steps (pp2 x dp_shard2, ZBVZeroBubble).
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule!r} with parallel.dp_shard={dp_shard} and "
            "parallel.fsdp_reshard_after_forward=true: FSDP frees the gathered weights "
            "between a zero-bubble schedule's forward and its separate weight-gradient pass, "
            "which then computes wrong gradients; set parallel.fsdp_reshard_after_forward="
            "false, or use GPipe, 1F1B or Interleaved1F1B"
        )


def eval_batches_per_rank(eval_batches: int, dp_size: int, micro_batches: int,
                          pp: int | None = None) -> int:
    """The validation micro-batches each of `dp_size` data-parallel ranks runs through a
    schedule built for `micro_batches` per round: eval_batches / dp_size. Raises ConfigError
    unless that is a positive number of whole rounds (the schedule runs only whole ones);
    `pp` (parallel.pp) only goes into the message."""
    rounds = micro_batches * dp_size
    if eval_batches <= 0 or eval_batches % rounds:
        layout = f" with parallel.pp={pp}" if pp is not None else " under pipeline parallelism"
        raise ConfigError(
            f"trainer.eval_batches={eval_batches}{layout}: evaluation runs the schedule over "
            f"whole groups of {micro_batches} micro-batches on each of the {dp_size} "
            f"data-parallel ranks; set trainer.eval_batches="
            f"{max(rounds, -(-eval_batches // rounds) * rounds)} (a multiple of {rounds})"
        )
    return eval_batches // dp_size
