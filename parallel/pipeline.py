"""Pipeline parallelism: cut a built Transformer into stages, run them with a schedule from
`torch.distributed.pipelining`, and report the loss and the global gradient norm on every
pipeline rank.

Stage layout. The model's `n_layers` are cut into `pp x stages_per_rank` contiguous stages;
stage 0 also owns the embeddings, the last stage the final norm and the LM head. Which rank
runs which stage depends on the schedule:
- "loop" (GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble): rank r owns r, r+p, r+2p, ...
- "v" (ZBVZeroBubble, DualPipeV): rank r owns r and 2p-1-r, so rank 0 holds both ends.

A stage module is the full model with every module it does not own deleted (set to None or
dropped from `layers`), so its parameter names (FQNs) are those of the full model and
checkpoints, the tensor-parallel plan and FSDP address the same weights in every layout.

Loss scaling. The single-process trainer backpropagates `loss / micro_batches` for every
micro-batch. The schedules here are built with `scale_grads=False` and a loss function that
divides by the micro-batch count itself, so each micro-batch's backward is seeded with the
same 1/m as in one process (torch's default, scale_grads=True, would instead divide the
summed gradients once at the end: equal in exact arithmetic, different in rounding).

Use from a training loop (every pp rank passes the same micro-batches):
    validate_pipeline(cfg.model, pp, schedule, stages_per_rank, micro_batches)  # at start
    pipe = build_pipeline(model, pp_mesh, schedule, stages_per_rank, micro_batches,
                          cross_entropy, device)
    optimizer = build_optimizer(pipe.model_parts, ...)
    loss = pipeline_step(pipe, micro_batches)                # mean loss, on every pp rank
    norm = parallel.grad_clip.clip_grad_norm(pipe.parameters(), max_norm, pp_group)
    val_loss = pipeline_eval(pipe, val_micro_batches)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules
from torch.distributed.tensor import DTensor

from scaleforge.core.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.transformer import Transformer

Layout = Literal["loop", "v"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

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


def _check_stages_per_rank(schedule: str, spec: ScheduleSpec, stages_per_rank: int) -> None:
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
                f"(parallel.pp x parallel.pp_stages_per_rank); lower parallel.pp or "
                "parallel.pp_stages_per_rank, or use a deeper model"
            )
        if n_layers % num_stages:
            raise ConfigError(
                f"model.n_layers={n_layers} is not divisible by the {num_stages} pipeline "
                f"stages (parallel.pp x parallel.pp_stages_per_rank); change parallel.pp or "
                f"parallel.pp_stages_per_rank, or give {LAYERS_PER_STAGE_SETTING} explicitly"
            )
        counts = [n_layers // num_stages] * num_stages
    starts = [sum(counts[:i]) for i in range(num_stages)]
    return [range(start, start + count) for start, count in zip(starts, counts, strict=True)]


def check_micro_batches(schedule: str, pp: int, stages_per_rank: int, micro_batches: int) -> None:
    """ConfigError unless `micro_batches` per step can feed the schedule: at least one per
    stage, and for the interleaved schedules a multiple of torch's number of rounds."""
    num_stages = pp * stages_per_rank
    if micro_batches < num_stages:
        raise ConfigError(
            f"{micro_batches} micro-batches per step (trainer.global_batch_tokens / "
            f"(trainer.micro_batch_size x data.seq_len x data-parallel size)) are fewer than the "
            f"{num_stages} pipeline stages (parallel.pp x parallel.pp_stages_per_rank); raise "
            "trainer.global_batch_tokens, lower trainer.micro_batch_size or lower parallel.pp"
        )
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        # torch runs the micro-batches in rounds of pp and needs whole rounds.
        rounds = max(1, micro_batches // pp)
        if micro_batches % rounds:
            raise ConfigError(
                f"parallel.pp_schedule={schedule!r} needs the micro-batch count per step "
                f"({micro_batches}) to be a multiple of parallel.pp={pp}; adjust "
                "trainer.global_batch_tokens or trainer.micro_batch_size"
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
) -> None:
    """Every pipeline rule, checked before any process group exists; raises ConfigError
    naming the setting, its value and the fix."""
    if pp < 1:
        raise ConfigError(f"parallel.pp={pp} must be at least 1")
    spec = schedule_spec(schedule)
    _check_stages_per_rank(schedule, spec, stages_per_rank)
    stage_layer_ranges(model_cfg.n_layers, pp * stages_per_rank, layers_per_stage)
    check_micro_batches(schedule, pp, stages_per_rank, micro_batches)
    check_tied_embeddings(model_cfg, pp, spec.layout)


def cut_stage(model: Transformer, stage: int, num_stages: int, layers: range) -> Transformer:
    """A module that runs stage `stage` of `num_stages`: `model` without the layers outside
    `layers`, without embeddings unless stage 0, without norm + head unless the last stage.

    Parameters and buffers are shared with `model`, not copied (a deepcopy with them in the
    memo), so the stage's weights are exactly the full model's and no memory is spent twice.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    part = copy.deepcopy(model, memo)
    if stage != 0:
        part.tok_embeddings = None
        part.pos_embeddings = None
    if stage != num_stages - 1:
        part.norm = None
        part.output = None
    for name in list(part.layers.keys()):
        if int(name) not in layers:
            del part.layers[name]
    return part


def split_model(
    model: Transformer,
    pp_rank: int,
    pp: int,
    schedule: str,
    stages_per_rank: int,
    layers_per_stage: Sequence[int] | None = None,
) -> list[tuple[int, Transformer]]:
    """(global stage index, stage module) for each stage pipeline rank `pp_rank` runs.

    `model` is the full model, built with the run's seed (or on meta, to be materialised
    after cutting), so stage weights equal the single-process weights.
    """
    spec = schedule_spec(schedule)
    _check_stages_per_rank(schedule, spec, stages_per_rank)
    check_tied_embeddings(model.cfg, pp, spec.layout)
    num_stages = pp * stages_per_rank
    ranges = stage_layer_ranges(model.cfg.n_layers, num_stages, layers_per_stage)
    return [
        (index, cut_stage(model, index, num_stages, ranges[index]))
        for index in stage_indices(pp_rank, pp, stages_per_rank, spec.layout)
    ]


def _unique_parameters(modules: Sequence[nn.Module]) -> Iterator[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    for module in modules:
        for name, param in module.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param


class Pipeline:
    """This rank's stages of a pipelined model and the schedule that runs them.

    `model_parts` (an nn.ModuleList of stage modules) is what an optimizer, activation
    checkpointing or FSDP should be applied to; `named_parameters` yields full-model FQNs.
    """

    def __init__(
        self,
        stages: list[tuple[int, Transformer]],
        schedule_name: str,
        group: dist.ProcessGroup,
        micro_batches: int,
        loss_fn: LossFn,
        device: torch.device,
    ):
        self.schedule_name = schedule_name
        self.group = group
        self.micro_batches = micro_batches
        self.stage_ids = [index for index, _ in stages]
        self.model_parts = nn.ModuleList([module for _, module in stages])
        self.pp = dist.get_world_size(group)
        num_stages = self.pp * len(stages)
        self.is_first = 0 in self.stage_ids
        self.is_last = num_stages - 1 in self.stage_ids
        self.device = device
        self.loss_fn = loss_fn
        self.layout = SCHEDULES[schedule_name].layout
        # group rank that runs each global stage, for the forward-only path of pipeline_eval
        self.stage_owner = {
            index: rank
            for rank in range(self.pp)
            for index in stage_indices(rank, self.pp, len(stages), self.layout)
        }
        self.stages = [
            PipelineStage(module, index, num_stages, device, group=group)
            for index, module in stages
        ]

        def scaled_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            # 1/m per micro-batch, exactly as the single-process accumulation (module doc).
            return loss_fn(output, target) / micro_batches

        spec = SCHEDULES[schedule_name]
        schedule_class = getattr(torch_schedules, spec.torch_class)
        self.schedule = schedule_class(
            self.stages if spec.multi_stage else self.stages[0],
            n_microbatches=micro_batches,
            loss_fn=scaled_loss,
            scale_grads=False,
        )

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(full-model FQN, parameter) of this rank's stages; a tied weight appears once."""
        return _unique_parameters(list(self.model_parts))

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters, each once."""
        return (param for _, param in self.named_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's share of the full model's state dict, keyed by full-model FQN."""
        merged: dict[str, torch.Tensor] = {}
        for module in self.model_parts:
            merged.update(module.state_dict())
        return merged


def _pp_group(pp_mesh: DeviceMesh | dist.ProcessGroup) -> dist.ProcessGroup:
    if isinstance(pp_mesh, DeviceMesh):
        if pp_mesh.ndim != 1:
            raise ValueError(f"expected the 1-D pipeline mesh, got a {pp_mesh.ndim}-D mesh")
        return pp_mesh.get_group()
    return pp_mesh


def build_pipeline(
    model: Transformer,
    pp_mesh: DeviceMesh | dist.ProcessGroup,
    schedule: str,
    stages_per_rank: int,
    micro_batches: int,
    loss_fn: LossFn,
    device: torch.device | str,
    layers_per_stage: Sequence[int] | None = None,
) -> Pipeline:
    """Cut `model` into this rank's stages and build `schedule` over them.

    model: the full model, initialised with the run's seed (weights equal single-process).
    pp_mesh: the pipeline axis, a 1-D DeviceMesh or its process group; pp = its size.
    micro_batches: micro-batches per optimizer step (>= pp x stages_per_rank).
    loss_fn(logits (B, T, V), targets (B, T)) -> mean loss over the micro-batch, a scalar.
    Raises ConfigError (see validate_pipeline) for an invalid combination.
    """
    group = _pp_group(pp_mesh)
    pp, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    validate_pipeline(model.cfg, pp, schedule, stages_per_rank, micro_batches, layers_per_stage)
    stages = split_model(model, pp_rank, pp, schedule, stages_per_rank, layers_per_stage)
    return Pipeline(stages, schedule, group, micro_batches, loss_fn, torch.device(device))


def pipeline_step(
    pipeline: Pipeline, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Forward and backward of one optimizer step over `micro_batches` [(inputs, targets)],
    each (micro_batch_size, T) int64; gradients accumulate into the stage parameters.

    Every pipeline rank passes the same micro-batches (only the first stage reads inputs,
    only the last reads targets). Returns the mean loss over the micro-batches (the same
    number the single-process trainer reports) as a 0-dim fp32 tensor on every pp rank.
    """
    if len(micro_batches) != pipeline.micro_batches:
        raise ValueError(
            f"pipeline_step got {len(micro_batches)} micro-batches; the schedule was built "
            f"for {pipeline.micro_batches}"
        )
    device = pipeline.device
    # The schedule re-splits the concatenation along dim 0 into exactly these micro-batches.
    inputs = torch.cat([x for x, _ in micro_batches]).to(device) if pipeline.is_first else None
    targets = torch.cat([y for _, y in micro_batches]).to(device) if pipeline.is_last else None
    losses: list[torch.Tensor] = []
    args = (inputs,) if inputs is not None else ()
    pipeline.schedule.step(*args, target=targets, losses=losses, return_outputs=False)
    # Each entry is already loss / m, so the sum is the mean; the other ranks add zero.
    total = torch.zeros((), dtype=torch.float32, device=device)
    if pipeline.is_last:
        total += torch.stack([_plain(loss).detach().float() for loss in losses]).sum()
    dist.all_reduce(total, group=pipeline.group)
    return total


def _plain(loss: torch.Tensor) -> torch.Tensor:
    """A loss as a plain tensor: under tensor parallelism it is a replicated DTensor."""
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def _sequential_forward_loss(
    pipeline: Pipeline, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Loss of one micro-batch (B, T) pushed through the stages one after the other with
    blocking send/recv; 0 on ranks without the last stage. Hidden states travel as fp32,
    their shape first (under tensor parallelism a stage sends its sequence shard)."""
    modules = dict(zip(pipeline.stage_ids, pipeline.model_parts, strict=True))
    owner, me = pipeline.stage_owner, dist.get_rank(pipeline.group)
    num_stages = len(owner)
    hidden = None
    loss = torch.zeros((), dtype=torch.float32, device=pipeline.device)
    for stage in range(num_stages):
        if owner[stage] != me:
            continue
        if stage == 0:
            hidden = inputs.to(pipeline.device)
        elif owner[stage - 1] != me:
            shape = torch.empty(3, dtype=torch.int64)
            dist.recv(shape, group=pipeline.group, group_src=owner[stage - 1])
            hidden = torch.empty(*shape.tolist(), device=pipeline.device)
            dist.recv(hidden, group=pipeline.group, group_src=owner[stage - 1])
        hidden = modules[stage](hidden)
        if stage == num_stages - 1:
            loss = _plain(pipeline.loss_fn(hidden, targets.to(pipeline.device))).float()
        elif owner[stage + 1] != me:
            dist.send(torch.tensor(hidden.shape, dtype=torch.int64), group=pipeline.group,
                      group_dst=owner[stage + 1])
            dist.send(hidden.float().contiguous(), group=pipeline.group,
                      group_dst=owner[stage + 1])
    return loss


@torch.no_grad()
def pipeline_eval(
    pipeline: Pipeline, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Mean loss over `micro_batches` [(inputs, targets)], each (B, T) int64, with forward
    passes only; a 0-dim fp32 tensor on every pp rank. Every rank passes the same list, whose
    length must be a multiple of `pipeline.micro_batches` (the schedule runs groups of that
    size). Leaves no gradients behind.

    Loop layouts run torch's `schedule.eval`. The V schedules' eval fails in torch 2.13 (their
    action list hands a backward between the two local stages even without backward:
    "can't steal_bwd_input if this stage doesn't have backward"), so they push each
    micro-batch through the stages in order instead: no overlap, same numbers.
    """
    m = pipeline.micro_batches
    if not micro_batches or len(micro_batches) % m:
        raise ConfigError(
            f"trainer.eval_batches={len(micro_batches)} must be a positive multiple of the "
            f"{m} micro-batches per step under pipeline parallelism; set it to a multiple of {m}"
        )
    total = torch.zeros((), dtype=torch.float32, device=pipeline.device)
    if pipeline.layout == "v":
        for inputs, targets in micro_batches:
            total += _sequential_forward_loss(pipeline, inputs, targets) / m
    else:
        for start in range(0, len(micro_batches), m):
            group = micro_batches[start:start + m]
            losses: list[torch.Tensor] = []
            device = pipeline.device
            args = (torch.cat([x for x, _ in group]).to(device),) if pipeline.is_first else ()
            targets = torch.cat([y for _, y in group]).to(device) if pipeline.is_last else None
            pipeline.schedule.eval(*args, target=targets, losses=losses)
            if pipeline.is_last:  # each entry is loss / m (the schedule's scaled loss)
                total += torch.stack([_plain(loss).float() for loss in losses]).sum()
    dist.all_reduce(total, group=pipeline.group)
    return total / (len(micro_batches) // m)


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
