"""The layouts of a run on a cluster: enumerate, check with the trainer's rules, size, time.

Axes (each pinned by an explicit `parallel.*` / `trainer.*` setting, else enumerated):
tp over the divisors of gpus_per_node; pp over the divisors of the rest; every pipeline
schedule in parallel.pipeline_schedules.SCHEDULES with its stages per rank (1 for GPipe
and 1F1B, 2 for the V schedules, 2, 4 and 8 for the interleaved ones); dp_replicate x
dp_shard = the rest; activation checkpointing none, full, selective; micro-batch sizes
dividing the sequences of a data-parallel rank's batch (powers of two up to 16). Each
candidate is a Config checked by `core.config.validate` for the world size, so the planner
rejects exactly what the trainer rejects (two settings a user sets with the layout are
filled in for pipelines: `trainer.eval_batches` the smallest valid, and
`parallel.fsdp_reshard_after_forward=false` for the zero-bubble schedules with FSDP).

A layout fits when its largest rank's total stays within `USABLE_FRACTION` of the GPU's
memory (the rest: the CUDA context, the caching allocator's fragmentation, NCCL's own
buffers). Memory is computed for every pipeline rank (dp rank 0, tp rank 0: the largest of
its stage, see planner/shards.py) and the largest is reported.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from scaleforge.core.config import Config, micro_batches_per_step, validate
from scaleforge.core.flops import training_flops_per_token
from scaleforge.errors import ConfigError, messages_of
from scaleforge.parallel.expert_parallel import widest_ep
from scaleforge.parallel.expert_tensor_parallel import etp_for_layout
from scaleforge.parallel.pipeline_schedules import (
    SCHEDULES,
    schedule_spec,
    stage_indices,
    stage_layer_ranges,
)
from scaleforge.parallel.topology import ParallelDims
from scaleforge.planner.activations import (
    ActivationSetting,
    head_bytes,
    in_flight_micro_batches,
    layers_bytes,
    peak_block_bytes,
    recompute_bytes,
    stage_io_bytes,
)
from scaleforge.planner.buffers import buffer_bytes
from scaleforge.planner.hardware import GB, GpuSpec
from scaleforge.planner.shards import ShardProbe
from scaleforge.planner.step_time import (
    StepTime,
    StepWork,
    float8_gathered_fraction,
    step_time,
)

USABLE_FRACTION = 0.9
CHECKPOINTING = ("none", "selective", "full")
INTERLEAVED_STAGES = (2, 4, 8)
MAX_MICRO_BATCH_SIZE = 16


@dataclass(frozen=True)
class Layout:
    """One candidate: the parallel sizes, the pipeline schedule (None without pp), the
    activation checkpointing mode and the micro-batch size."""

    tp: int
    pp: int
    dp_replicate: int
    dp_shard: int
    schedule: str | None
    stages_per_rank: int
    checkpointing: str
    micro_batch_size: int

    def describe(self) -> str:
        pipeline = "-" if self.schedule is None else (
            self.schedule if self.stages_per_rank == 1
            else f"{self.schedule} v{self.stages_per_rank}")
        return (f"tp {self.tp} pp {self.pp} dp_rep {self.dp_replicate} dp_shard "
                f"{self.dp_shard} | {pipeline} | AC {self.checkpointing} | mbs "
                f"{self.micro_batch_size}")


@dataclass(frozen=True)
class Memory:
    """Bytes on one rank."""

    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float

    @property
    def state(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.state + self.activations + self.buffers


@dataclass
class PlannedLayout:
    """A layout with its largest rank's memory, predicted step and whether it fits; a
    layout that does not fit gets `reason` (what overflows) and `fix` (what fits instead)."""

    layout: Layout
    config: Config
    memory: Memory
    time: StepTime
    tokens_per_s_per_gpu: float
    mfu: float
    fits: bool
    reason: str = ""
    fix: str = ""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pipelines(pp: int, cfg: Config, pinned: set[str]) -> Iterator[tuple[str | None, int]]:
    if pp == 1:
        yield None, 1
        return
    names = [cfg.parallel.pp_schedule] if "parallel.pp_schedule" in pinned else list(SCHEDULES)
    for name in names:
        spec = SCHEDULES[name]
        if "parallel.pp_stages_per_rank" in pinned:
            counts: tuple[int, ...] = (cfg.parallel.pp_stages_per_rank,)
        elif spec.layout == "v":
            counts = (2,)
        else:
            counts = INTERLEAVED_STAGES if spec.multi_stage else (1,)
        for count in counts:
            yield name, count


def _choices(pinned: set[str], key: str, value: int | str, options: list) -> list:
    return [value] if key in pinned else options


def candidates(cfg: Config, gpus: int, gpus_per_node: int,
               pinned: set[str]) -> Iterator[Layout]:
    """Every combination of the axes (module docstring), before the trainer's checks."""
    p, t = cfg.parallel, cfg.trainer
    sequences = t.global_batch_tokens // cfg.data.seq_len
    for tp in _choices(pinned, "parallel.tp", p.tp, _divisors(gpus_per_node)):
        for pp in _choices(pinned, "parallel.pp", p.pp, _divisors(gpus // tp)):
            rest = gpus // (tp * pp * p.cp)  # cp is taken as set, not enumerated
            if gpus % (tp * pp * p.cp):
                continue
            for dp_replicate in _choices(pinned, "parallel.dp_replicate", p.dp_replicate,
                                         _divisors(rest)):
                dp_shard = rest // dp_replicate
                if "parallel.dp_shard" in pinned and p.dp_shard not in (-1, dp_shard):
                    continue
                dp = dp_replicate * dp_shard
                sizes = [b for b in _divisors(max(1, sequences // dp))
                         if b <= MAX_MICRO_BATCH_SIZE and b & (b - 1) == 0]
                for schedule, stages in _pipelines(pp, cfg, pinned):
                    for mode in _choices(pinned, "trainer.activation_checkpointing",
                                         t.activation_checkpointing, list(CHECKPOINTING)):
                        for size in _choices(pinned, "trainer.micro_batch_size",
                                             t.micro_batch_size, sizes):
                            yield Layout(tp, pp, dp_replicate, dp_shard, schedule, stages,
                                         mode, size)


def layout_config(cfg: Config, layout: Layout, pinned: set[str]) -> Config:
    """`cfg` with `layout`'s settings (see the module docstring for the two filled in)."""
    parallel = replace(cfg.parallel, tp=layout.tp, pp=layout.pp,
                       dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard)
    if "parallel.ep" not in pinned:  # MoE: the widest ep that divides experts and dp_shard x cp
        parallel.ep = widest_ep(cfg.model, layout.dp_shard, parallel.cp)
    parallel.etp = etp_for_layout(cfg.parallel.etp, layout.tp)  # experts split over tp, or not
    trainer = replace(cfg.trainer, activation_checkpointing=layout.checkpointing,
                      micro_batch_size=layout.micro_batch_size)
    if layout.schedule is not None:
        parallel = replace(parallel, pp_schedule=layout.schedule,
                           pp_stages_per_rank=layout.stages_per_rank)
        dp = layout.dp_replicate * layout.dp_shard
        tokens = layout.micro_batch_size * cfg.data.seq_len * dp
        if "trainer.eval_batches" not in pinned and cfg.trainer.global_batch_tokens % tokens == 0:
            trainer = replace(trainer, eval_batches=cfg.trainer.global_batch_tokens // tokens * dp)
        if (SCHEDULES[layout.schedule].splits_backward and layout.dp_shard > 1
                and "parallel.fsdp_reshard_after_forward" not in pinned):
            parallel = replace(parallel, fsdp_reshard_after_forward=False)
    return replace(cfg, parallel=parallel, trainer=trainer)


def rank_memory(cfg: Config, dims: ParallelDims, pp_rank: int, probe: ShardProbe) -> Memory:
    """Bytes on the rank at (pp_rank, dp 0, tp 0) of `cfg`'s validated layout `dims`."""
    p, t = cfg.parallel, cfg.trainer
    schedule = p.pp_schedule if dims.pp > 1 else None
    stages = p.pp_stages_per_rank if dims.pp > 1 else 1
    fsdp = fsdp_dims(dims)
    state, gathered = probe.rank_state(fsdp, pp_rank, schedule, stages, p.pp_layers_per_stage)
    micro_batches = micro_batches_per_step(cfg, dims.dp_size)
    activations = rank_activation_bytes(activation_setting(cfg, dims), dims, pp_rank, schedule,
                                        stages, micro_batches, p.pp_layers_per_stage)
    buffers = buffer_bytes(gathered, t.precision, fsdp.dp_shard, fsdp.dp_size, dims.pp,
                           micro_batches, p.fsdp_reshard_after_forward, t.fp8,
                           float8_gathered_fraction(cfg.model) if t.fp8 != "none" else 0.0)
    return Memory(state.params, state.grads, state.optimizer, activations, buffers)


def fsdp_dims(dims: ParallelDims) -> ParallelDims:
    """`dims` as FSDP shards them: over dp_shard x cp (the cp ranks hold the same weights,
    parallel/data_parallel.py), i.e. like dp_shard x cp data-parallel ranks."""
    return replace(dims, dp_shard=dims.dp_shard * dims.cp, cp=1)


def activation_setting(cfg: Config, dims: ParallelDims) -> ActivationSetting:
    """How `cfg`'s micro-batches run through the blocks under layout `dims`."""
    t = cfg.trainer
    return ActivationSetting(cfg.model, cfg.data.seq_len, t.micro_batch_size, dims.tp,
                             t.precision, dims.dp_size * dims.cp > 1,
                             t.activation_checkpointing, t.checkpoint_every_n_blocks, dims.cp,
                             cfg.parallel.etp)


def rank_activation_bytes(
    setting: ActivationSetting, dims: ParallelDims, pp_rank: int, schedule: str | None,
    stages_per_rank: int, micro_batches: int, layers_per_stage: list[int] | None = None,
) -> float:
    """Activation bytes at the peak of the rank at `pp_rank`: its stages' blocks (and the
    head on the last stage) for each micro-batch in flight, plus a recomputed block."""
    n_layers = setting.model.n_layers
    if dims.pp == 1 or schedule is None:
        per_micro_batch = layers_bytes(setting, range(n_layers)) + head_bytes(setting)
    else:
        num_stages = dims.pp * stages_per_rank
        ranges = stage_layer_ranges(n_layers, num_stages, layers_per_stage)
        per_micro_batch = 0.0
        for stage in stage_indices(pp_rank, dims.pp, stages_per_rank,
                                   schedule_spec(schedule).layout):
            per_micro_batch += layers_bytes(setting, ranges[stage]) + stage_io_bytes(setting)
            if stage == num_stages - 1:
                per_micro_batch += head_bytes(setting)
    in_flight = in_flight_micro_batches(schedule, dims.pp, pp_rank, micro_batches,
                                        stages_per_rank)
    return in_flight * per_micro_batch + recompute_bytes(setting)


def evaluate(cfg: Config, layout: Layout, dims: ParallelDims, probe: ShardProbe, gpu: GpuSpec,
             gpus_per_node: int) -> PlannedLayout:
    """Memory of the largest rank and the predicted step of the validated `cfg`."""
    ranks = [rank_memory(cfg, dims, r, probe) for r in range(dims.pp)]
    largest = max(ranks, key=lambda m: m.total)
    t, p = cfg.trainer, cfg.parallel
    micro_batches = micro_batches_per_step(cfg, dims.dp_size)
    _, gathered = probe.rank_state(fsdp_dims(dims), 0, layout.schedule, layout.stages_per_rank,
                                   p.pp_layers_per_stage)
    work = StepWork(cfg.model, cfg.data.seq_len, t.global_batch_tokens, t.micro_batch_size,
                    micro_batches, dims, layout.schedule, layout.stages_per_rank,
                    t.activation_checkpointing, t.checkpoint_every_n_blocks, t.precision,
                    p.fsdp_reshard_after_forward, gathered, p.ep, p.etp, t.fp8)
    time = step_time(work, gpu, gpus_per_node)
    tokens_per_s = t.global_batch_tokens / time.step_s / dims.world_size
    model_flops = training_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_s
    fits = largest.total <= USABLE_FRACTION * gpu.memory_bytes
    return PlannedLayout(layout, cfg, largest, time, tokens_per_s, model_flops / gpu.peak_flops,
                         fits)


def plan_layouts(cfg: Config, gpus: int, gpu: GpuSpec, gpus_per_node: int,
                 pinned: set[str], probe: ShardProbe) -> list[PlannedLayout]:
    """Every layout of `gpus` GPUs that passes the trainer's checks: the fitting ones by
    predicted tokens/s per GPU (fastest first), then the others by memory (closest to
    fitting first), each with its reason and fix. Raises ConfigError when no layout passes
    the checks."""
    planned: list[PlannedLayout] = []
    first_error = None
    for layout in candidates(cfg, gpus, gpus_per_node, pinned):
        config = layout_config(cfg, layout, pinned)
        try:
            dims = validate(config, gpus)
        except ConfigError as error:
            first_error = first_error or "; ".join(messages_of(error))
            continue
        planned.append(evaluate(config, layout, dims, probe, gpu, gpus_per_node))
    if not planned:
        raise ConfigError(
            f"no layout of gpus={gpus} passes the trainer's checks for model "
            f"{cfg.model.name} (data.seq_len={cfg.data.seq_len}, trainer.global_batch_tokens="
            f"{cfg.trainer.global_batch_tokens}); the first candidate failed with: "
            f"{first_error}"
        )
    usable = USABLE_FRACTION * gpu.memory_bytes
    for row in planned:
        if not row.fits:
            row.reason = overflow_reason(row.memory, usable)
    explain_fixes(planned)
    planned.sort(key=lambda row: (not row.fits, -row.tokens_per_s_per_gpu if row.fits
                                  else row.memory.total))
    return planned


def overflow_reason(memory: Memory, usable: float) -> str:
    """What overflows `usable` bytes, in words: 'activations need 96.0 GB but 41.0 GB are
    left after the parameters, gradients, optimizer state and FSDP buffers'."""
    if memory.state > usable:
        need, have = _two_sizes(memory.state, usable)
        return (f"parameters, gradients and optimizer state need {need} but {have} are "
                "usable")
    if memory.state + memory.buffers > usable:
        need, have = _two_sizes(memory.buffers, usable - memory.state)
        return (f"FSDP's gathered weights and gradients need {need} but {have} are left "
                "after the parameters, gradients and optimizer state")
    need, have = _two_sizes(memory.activations, usable - memory.state - memory.buffers)
    return (f"activations need {need} but {have} are left after the parameters, gradients, "
            "optimizer state and FSDP buffers")


def _two_sizes(need: float, have: float) -> tuple[str, str]:
    """`need` and `have` in GB with as many decimals (1 to 3) as it takes to tell them
    apart (never '16.0 GB > 16.0 GB')."""
    for decimals in (1, 2, 3):
        texts = f"{need / GB:.{decimals}f} GB", f"{have / GB:.{decimals}f} GB"
        if texts[0] != texts[1]:
            break
    return texts


_KNOBS = ("tp", "pipeline", "dp_shard", "checkpointing", "micro_batch_size")


def _knobs(layout: Layout) -> dict[str, object]:
    return {"tp": layout.tp, "pipeline": (layout.pp, layout.schedule, layout.stages_per_rank),
            "dp_shard": layout.dp_shard, "checkpointing": layout.checkpointing,
            "micro_batch_size": layout.micro_batch_size}


def _knob_text(knob: str, row: Layout, other: Layout) -> str:
    """The settings that turn layout `row` into `other` (which differ in `knob` only)."""
    if knob == "checkpointing":
        return f"trainer.activation_checkpointing={other.checkpointing}"
    if knob == "micro_batch_size":
        return f"trainer.micro_batch_size={other.micro_batch_size}"
    if knob == "tp":
        return f"parallel.tp={other.tp}"
    if knob == "dp_shard":
        return f"parallel.dp_shard={other.dp_shard} (dp_replicate {other.dp_replicate})"
    settings = [] if other.pp == row.pp else [f"parallel.pp={other.pp}"]
    if other.schedule is not None and (other.schedule, other.stages_per_rank) != (
            row.schedule, row.stages_per_rank):
        settings += [f"parallel.pp_schedule={other.schedule}",
                     f"parallel.pp_stages_per_rank={other.stages_per_rank}"]
    return " ".join(settings)


def explain_fixes(planned: list[PlannedLayout]) -> None:
    """Fill `fix` of each layout that does not fit with the fitting layouts (fastest first)
    that differ from it in one setting: activation checkpointing, micro-batch size, tp,
    the pipeline or dp_shard (dp_replicate then takes the rest of the GPUs)."""
    best: dict[tuple[str, tuple], PlannedLayout] = {}
    for row in planned:
        if not row.fits:
            continue
        knobs = _knobs(row.layout)
        for knob in _KNOBS:
            key = (knob, tuple(v for k, v in knobs.items() if k != knob))
            if key not in best or row.tokens_per_s_per_gpu > best[key].tokens_per_s_per_gpu:
                best[key] = row
    for row in planned:
        if row.fits:
            continue
        knobs = _knobs(row.layout)
        fixes = []
        for knob in _KNOBS:
            other = best.get((knob, tuple(v for k, v in knobs.items() if k != knob)))
            if other is not None:
                fixes.append((other.tokens_per_s_per_gpu,
                              _knob_text(knob, row.layout, other.layout)))
        fixes.sort(reverse=True)
        row.fix = ("fits with " + " or ".join(text for _, text in fixes[:3]) if fixes else
                   "no layout one setting away fits: more GPUs, or a GPU with more memory")


def largest_block_bytes(cfg: Config, gpus: int, gpus_per_node: int, probe: ShardProbe) -> float:
    """The least one transformer block can take on a GPU: its parameters, gradients and
    AdamW state sharded over the most GPUs the trainer allows (the largest valid tp within
    a node, FSDP over the rest), its gathered weights and gradients, and its activations
    at micro-batch size 1 (full checkpointing still recomputes the whole block)."""
    m = cfg.model
    tp = max(t for t in _divisors(gpus_per_node) if gpus % t == 0 and m.n_heads % t == 0
             and m.kv_heads % t == 0 and m.mlp_hidden % t == 0 and m.vocab_rows % t == 0
             and cfg.data.seq_len % t == 0)
    block = [shard for name, shard in probe.shards(tp, gpus // tp).items()
             if name.startswith("layers.")]
    state = sum(4 * shard.local_elements * shard.element_bytes for shard in block)
    gathered = sum(6 * shard.tp_local_elements for shard in block)  # bf16 weights, fp32 grads
    setting = ActivationSetting(m, cfg.data.seq_len, 1, tp, cfg.trainer.precision, True)
    return state + gathered + peak_block_bytes(setting)
