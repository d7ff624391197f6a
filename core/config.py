"""The root configuration: the packages' settings composed by Hydra, and the rules between them.

Each package owns its settings and the checks of its own fields (`models.TransformerConfig`,
`parallel.config.ParallelConfig`, `data_pipeline.config.DataConfig`), and so does each part
of the run (`core.optimizer.OptimConfig`, `core.checkpoint.config.CheckpointConfig`,
`core.metrics.LoggingConfig`); the training loop's own (`TrainerConfig`) are here. `Config`
composes them and is registered in Hydra's ConfigStore as the schema of `configs/config.yaml`,
so an unknown key or a wrongly typed value fails at start with the key named. `validate`
checks every field and the rules that span several settings, once, before any process group
or data exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from scaleforge.core.checkpoint.config import CheckpointConfig
from scaleforge.core.fault_injection import injected_faults
from scaleforge.core.metrics import LoggingConfig
from scaleforge.core.optimizer import OptimConfig
from scaleforge.core.precision import check_precision_device, resolve_precision
from scaleforge.core.preemption import parse_signals
from scaleforge.core.profiling import check_profile_steps
from scaleforge.data_pipeline.config import DataConfig
from scaleforge.data_pipeline.vocabulary import data_vocab_size
from scaleforge.errors import ConfigError, ErrorCollector, check_choice
from scaleforge.models.attention import AttentionRun, check_attention
from scaleforge.models.config import TransformerConfig
from scaleforge.parallel.config import ParallelConfig
from scaleforge.parallel.context_parallel import check_cp_impl
from scaleforge.parallel.expert_parallel import check_expert_parallel
from scaleforge.parallel.expert_tensor_parallel import check_expert_tensor_parallel
from scaleforge.parallel.float8 import FP8_RECIPES, check_fp8
from scaleforge.parallel.layout import check_layout_model, layout_dims
from scaleforge.parallel.parallelize import BuildPlan
from scaleforge.parallel.pipeline_rules import check_pipeline_layout
from scaleforge.parallel.run_setup import check_backend, resolve_device
from scaleforge.parallel.topology import ParallelDims

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINTING_MODES = ("none", "full", "selective")
DEVICES = ("auto", "cpu", "cuda")
NONFINITE_ACTIONS = ("skip", "stop")
STRAGGLER_ACTIONS = ("warn", "stop")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value} must be positive")


@dataclass
class TrainerConfig:
    """The training loop. One optimizer step consumes `global_batch_tokens` tokens, split
    into micro-batches of `micro_batch_size` sequences (gradient accumulation)."""

    max_steps: int = 1000  # optimizer steps to train
    global_batch_tokens: int = 65536  # tokens per optimizer step, over all ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    # Compute precision: fp32, bf16 (fp32 master weights), fp16, or auto = bf16 on CUDA and
    # fp32 on CPU (CPUs often emulate bf16, several times slower).
    precision: str = "auto"
    # Float8 matmuls in the transformer blocks' linears (torchao, parallel/float8.py): none,
    # tensorwise (per-tensor scales; FSDP gathers weights in float8) or rowwise.
    fp8: str = "none"
    activation_checkpointing: str = "none"  # recompute activations: none, selective, full
    # Checkpoint every k-th block only (1 = every block); applies to "full" and "selective".
    checkpoint_every_n_blocks: int = 1
    # Evaluate on the validation split every N steps, at the start and at the end (0: never).
    eval_every: int = 100
    eval_batches: int = 8  # validation micro-batches per evaluation
    log_every: int = 10  # log training metrics every N steps
    seed: int = 0  # seeds the weights and every other random draw of the run
    device: str = "auto"  # auto (cuda when available), cpu or cuda
    # Deterministic kernels (core/precision.py set_numerics): null (auto) = true on CPU
    # (bitwise repeatable), false on CUDA; true on CUDA is strict (slower; an op without a
    # deterministic kernel raises).
    deterministic: bool | None = None
    # CUDA float32 matmuls on TF32 tensor cores; false for strict IEEE fp32.
    tf32: bool = True
    save_final_weights: bool = True  # write RUN_DIR/final_model.pt at the end
    # torch.compile each transformer block (after activation checkpointing, before FSDP).
    compile: bool = False
    # A step whose loss or global grad norm is NaN or infinite: skip its update or stop.
    on_nonfinite: str = "skip"
    # That many skipped steps in a row stop the run.
    max_skipped_steps: int = 10
    # Log a loss above its moving mean + spike_zscore x std as a spike (0: off), once
    # spike_warmup_steps losses have been seen. Logging only.
    spike_zscore: float = 6.0
    spike_warmup_steps: int = 100
    # Signals on which fit saves a checkpoint and returns (SLURM sends one before a kill).
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Continue a run from a checkpoint: auto = the newest complete one in run_dir (none in a
    # fresh run), never, or a path (a step_<N> directory or a run directory).
    resume: str = "auto"
    # Start from the weights of a checkpoint (a step_<N> or run directory, or what
    # `sf-convert from-hf` wrote) with a fresh optimizer at step 0. Ignored when resuming.
    init_from: str | None = None
    # Build everything (layout, model shards, optimizer, loaders, resume), report each rank's
    # memory and exit before step 1 (planner/dry_run.py).
    dry_run: bool = False
    # With dry_run: the GPU (h100, h200, a100, b200; planner/hardware.py) whose usable memory
    # the largest rank's total is compared with, as sf-plan counts it; null: none.
    dry_run_gpu: str | None = None
    # Report the validation loss and perplexity of the weights of trainer.init_from (or of
    # the checkpoint resumed) on this data config, and exit without training.
    eval_only: bool = False
    # [first, last]: write a torch.profiler trace of these steps per rank into
    # RUN_DIR/profile/ (Chrome/Perfetto; on CUDA also a memory snapshot); []: none.
    profile_steps: list[int] = field(default_factory=list)
    # A rank with no training progress for this long (seconds) dumps its stacks to
    # RUN_DIR/hang/ and the run ends naming the rank that stopped first
    # (core/callbacks/hang_watchdog.py). Below parallel.timeout_s, so it acts before the
    # collective times out; null: half of parallel.timeout_s, at most 300; 0: off.
    hang_timeout_s: float | None = None
    # A rank whose compute time per step exceeds the median rank's by this factor for 3 log
    # intervals in a row is named a straggler (core/callbacks/straggler.py); 0: off.
    straggler_ratio: float = 1.2
    # What naming a straggler does: warn (log it) or stop (save a checkpoint and exit 0, as
    # a preemption does, so the scheduler can replace the node).
    on_straggler: str = "warn"

    def evaluates_at(self, step: int) -> bool:
        """Whether the run evaluates after `step` (0: before training)."""
        return self.eval_every > 0 and (step % self.eval_every == 0 or step == self.max_steps)

    def check(self, prefix: str = "trainer") -> None:
        """Raise ConfigError naming the first field whose value is not allowed."""
        check_choice(f"{prefix}.precision", self.precision, PRECISIONS)
        check_choice(f"{prefix}.activation_checkpointing", self.activation_checkpointing,
                CHECKPOINTING_MODES)
        check_choice(f"{prefix}.device", self.device, DEVICES)
        check_choice(f"{prefix}.fp8", self.fp8, FP8_RECIPES)
        check_choice(f"{prefix}.on_nonfinite", self.on_nonfinite, NONFINITE_ACTIONS)
        check_choice(f"{prefix}.on_straggler", self.on_straggler, STRAGGLER_ACTIONS)
        if self.hang_timeout_s is not None and self.hang_timeout_s < 0:
            raise ConfigError(f"{prefix}.hang_timeout_s={self.hang_timeout_s} must be at least "
                              "0 (seconds; 0 turns the hang watchdog off)")
        if self.straggler_ratio != 0 and self.straggler_ratio <= 1:
            raise ConfigError(f"{prefix}.straggler_ratio={self.straggler_ratio} must be above 1 "
                              "(1.2: 20% slower than the median rank) or 0 (off)")
        if self.eval_every < 0:
            raise ConfigError(f"{prefix}.eval_every={self.eval_every} must be at least 0 "
                              "(0 turns evaluation off)")
        for name in ("max_steps", "global_batch_tokens", "micro_batch_size",
                     "eval_batches", "log_every", "checkpoint_every_n_blocks",
                     "max_skipped_steps", "spike_warmup_steps"):
            _positive(f"{prefix}.{name}", getattr(self, name))
        if self.spike_zscore < 0:
            raise ConfigError(
                f"{prefix}.spike_zscore={self.spike_zscore} must be at least 0 (0 turns the "
                "loss-spike detector off)"
            )
        parse_signals(self.preemption_signals, f"{prefix}.preemption_signals")
        check_profile_steps(self.profile_steps, self.max_steps, f"{prefix}.profile_steps")
        if not self.resume:
            raise ConfigError(f"{prefix}.resume is empty; use auto, never or a checkpoint path")


@dataclass
class Config:
    model: TransformerConfig = field(default_factory=TransformerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Where metrics, checkpoints and the config of the run go.
    run_dir: str = "runs/${now:%Y-%m-%d_%H-%M-%S}"


def register_configs() -> None:
    """Register the schema so `configs/config.yaml` can name it in its defaults list."""
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `configs/config.yaml` with command-line style `overrides`, as sf-train does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_configs()
    with initialize_config_module(config_module="scaleforge.configs", version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def to_config(cfg: DictConfig | ListConfig | Config) -> Config:
    """Resolve a Hydra DictConfig into the typed dataclass tree (TypeError for anything that
    does not resolve to a Config, e.g. a ListConfig), `model.vocab_size=null` included
    (`resolve_model_vocab`)."""
    if isinstance(cfg, Config):
        return cfg
    config = OmegaConf.to_object(cfg)
    if not isinstance(config, Config):
        raise TypeError(
            f"to_config needs a config composed on the Config schema (core.config.compose), "
            f"got one that resolves to {type(config).__name__}"
        )
    resolve_model_vocab(config)
    return config


# model.vocab_size=null rounds the tokenizer's size up to a multiple of this (whole tiles
# for the embedding and LM head matmuls, and divisible by any tp up to 128).
VOCAB_MULTIPLE = 128


def resolve_model_vocab(cfg: Config) -> str | None:
    """Set `model.vocab_size=null` to the data's vocabulary rounded up to a multiple of
    VOCAB_MULTIPLE and return the line saying so; None when it was set (or the data's
    vocabulary cannot be read: validation then names the data's problem)."""
    if cfg.model.vocab_size is not None:
        return None
    try:
        data = cfg.data.vocab_size if cfg.data.vocab_size is not None else data_vocab_size(
            cfg.data)
    except ConfigError:
        return None
    cfg.model.vocab_size = -(-data // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return (f"model.vocab_size=null: the tokenizer's {data:,} ids rounded up to a multiple "
            f"of {VOCAB_MULTIPLE}: {cfg.model.vocab_size:,}")


def micro_batches_per_step(cfg: Config, dp_size: int = 1) -> int:
    """Gradient-accumulation steps per optimizer step for `dp_size` data-parallel ranks."""
    t = cfg.trainer
    tokens_per_micro_batch = t.micro_batch_size * cfg.data.seq_len * dp_size
    if t.global_batch_tokens % tokens_per_micro_batch:
        raise ConfigError(
            f"trainer.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
            f"trainer.micro_batch_size x data.seq_len x data-parallel size = "
            f"{t.micro_batch_size} x {cfg.data.seq_len} x {dp_size} = "
            f"{tokens_per_micro_batch}; {_batch_fix(cfg, dp_size, tokens_per_micro_batch)}"
        )
    return t.global_batch_tokens // tokens_per_micro_batch


def _batch_fix(cfg: Config, dp_size: int, tokens_per_micro_batch: int) -> str:
    """The settings that make the global batch split into micro-batches: the nearest
    multiple for global_batch_tokens and, where the batch is whole sequences on every
    data-parallel rank, the largest micro_batch_size that divides them."""
    t = cfg.trainer
    micro_batches = max(1, round(t.global_batch_tokens / tokens_per_micro_batch))
    fix = (f"set trainer.global_batch_tokens={micro_batches * tokens_per_micro_batch} "
           f"({micro_batches} micro-batch{'es' if micro_batches > 1 else ''})")
    sequences, rest = divmod(t.global_batch_tokens, cfg.data.seq_len * dp_size)
    if not rest and sequences:
        size = max(d for d in range(1, min(t.micro_batch_size, sequences) + 1)
                   if sequences % d == 0)
        fix += f" or trainer.micro_batch_size={size}"
    return fix


def validate(cfg: Config, world_size: int = 1) -> ParallelDims:
    """Check every cross-field rule; raise ConfigError naming the setting and the fix.

    Independent problems are all reported at once (errors.ConfigErrors, one message each);
    a rule that builds on another (the pipeline's on the layout's) runs only when that one
    passed. Runs identically on every rank before any process group exists, so a bad layout
    stops all ranks with the same error and no rank is left waiting in a collective.
    Returns the layout's sizes, for `parallel.run_setup.init_topology`.
    """
    problems = ErrorCollector()
    ok = {name: problems.run(getattr(cfg, name).check, name)
          for name in ("model", "data", "trainer", "optim", "checkpoint", "logging",
                       "parallel")}
    for rule in (_check_warmup, _check_seq_len, _check_vocab, _check_rope_per_document,
                 _check_hang_timeout, _check_lora_fp8):
        problems.run(rule, cfg)
    problems.run(injected_faults)
    if cfg.model.vocab_size is None:  # null, unresolved: the rules that need it cannot run
        ok["model"] = False
        if problems.run(data_vocab_size, cfg.data):  # else _check_vocab named the data's
            problems.run(lambda: cfg.model.vocab_rows)
    if ok["trainer"] and ok["model"]:  # the device rules read a valid precision and kernel
        problems.run(_check_device, cfg)
        problems.run(lambda: check_fp8(cfg.trainer.fp8, cfg.model,
                                       resolve_device(cfg.trainer.device).type,
                                       cfg.trainer.compile))
    layout: list[ParallelDims] = []
    if problems.run(lambda: layout.append(layout_dims(cfg.parallel, world_size))):
        _validate_layout(cfg, layout[0], ok, problems)
    problems.raise_if_any()
    return layout[0]


def _check_lora_fp8(cfg: Config) -> None:
    # torchao's swap would replace the adapted projections by plain Float8Linear ones.
    if cfg.model.lora.enabled and cfg.trainer.fp8 != "none":
        raise ConfigError(
            f"model.lora.rank={cfg.model.lora.rank} with trainer.fp8={cfg.trainer.fp8}: the "
            "float8 layers would drop the adapters; set trainer.fp8=none for LoRA"
        )


def _check_warmup(cfg: Config) -> None:
    o, t = cfg.optim, cfg.trainer
    if o.warmup_steps < 0 or o.warmup_steps > t.max_steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} must lie in [0, trainer.max_steps="
            f"{t.max_steps}]; set optim.warmup_steps={min(max(o.warmup_steps, 0), t.max_steps)}"
        )


def _check_seq_len(cfg: Config) -> None:
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
            f"set data.seq_len={cfg.model.max_seq_len} (the default with data=shards or "
            f"data=streaming) or model.max_seq_len={cfg.data.seq_len}"
        )


def _check_vocab(cfg: Config) -> None:
    d = cfg.data
    vocab_size = d.vocab_size if d.vocab_size is not None else data_vocab_size(d)
    if cfg.model.vocab_size is not None and vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is below the data's vocabulary of "
            f"{vocab_size} ids (data.vocab_size); the model could not embed every token id: "
            f"set model.vocab_size={vocab_size} (or more)"
        )


# trainer.hang_timeout_s=null: this fraction of parallel.timeout_s, at most HANG_TIMEOUT_MAX_S.
HANG_TIMEOUT_FRACTION = 0.5
HANG_TIMEOUT_MAX_S = 300.0


def hang_timeout_s(cfg: Config) -> float:
    """The hang watchdog's timeout in seconds (0: off): `trainer.hang_timeout_s`, or for
    null half of `parallel.timeout_s`, at most 300 s."""
    if cfg.trainer.hang_timeout_s is not None:
        return cfg.trainer.hang_timeout_s
    return min(HANG_TIMEOUT_FRACTION * cfg.parallel.timeout_s, HANG_TIMEOUT_MAX_S)


def _check_hang_timeout(cfg: Config) -> None:
    hang, collective = hang_timeout_s(cfg), cfg.parallel.timeout_s
    if hang >= collective:
        raise ConfigError(
            f"trainer.hang_timeout_s={hang:g} is not below parallel.timeout_s={collective:g}: "
            "a hung collective would time out before the watchdog names the rank; set "
            f"trainer.hang_timeout_s={collective / 2:g} (or 0 to turn the watchdog off)"
        )


def _check_device(cfg: Config) -> None:
    t = cfg.trainer
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, t.device)
    check_precision_device(precision, device)
    m = cfg.model
    check_attention(m.attention, AttentionRun(
        device_type=device.type, precision=precision, grouped_query=m.kv_heads != m.n_heads,
        sliding_window=m.sliding_window, document_masking=cfg.data.document_masking))


def _check_rope_per_document(cfg: Config) -> None:
    if cfg.model.rope_per_document and not cfg.data.document_masking:
        raise ConfigError(
            "model.rope_per_document=true restarts positions at each document, which needs "
            "the batches' document ids; set data.document_masking=true"
        )


def _validate_layout(cfg: Config, dims: ParallelDims, ok: dict[str, bool],
                     problems: ErrorCollector) -> None:
    """The layout's rules, each where the settings it reads passed their own checks: the
    model against tp and cp, experts, the batch split, the pipeline, fp16, the backend."""
    model_ok, data_ok, trainer_ok = ok["model"], ok["data"], ok["trainer"]
    parallel_ok = ok["parallel"]
    if model_ok and data_ok:
        problems.run(check_layout_model, dims, cfg.model, cfg.data.seq_len)
    if model_ok:
        problems.run(check_expert_parallel, cfg.parallel.ep, dims, cfg.model)
        problems.run(check_expert_tensor_parallel, cfg.parallel.etp, dims.tp, cfg.model)
    if model_ok and data_ok and trainer_ok and parallel_ok:
        problems.run(lambda: check_cp_impl(cfg.parallel.cp_impl, dims, cfg.model,
                                           cfg.data.document_masking,
                                           resolve_device(cfg.trainer.device).type))
    micro_batches: list[int] = []
    if data_ok and trainer_ok and problems.run(
            lambda: micro_batches.append(micro_batches_per_step(cfg, dims.dp_size))):
        if dims.pp > 1 and model_ok and parallel_ok:
            problems.run(check_pipeline_layout, cfg.model, cfg.parallel, dims,
                         micro_batches[0], cfg.trainer.activation_checkpointing,
                         cfg.trainer.eval_batches,
                         cfg.trainer.micro_batch_size * cfg.data.seq_len * dims.dp_size)
    if trainer_ok:
        problems.run(_check_parallel_precision, cfg, dims)
        if dims.world_size > 1 and parallel_ok:
            problems.run(lambda: check_backend(cfg.parallel.backend,
                                               resolve_device(cfg.trainer.device)))


def _check_parallel_precision(cfg: Config, dims: ParallelDims) -> None:
    if cfg.trainer.precision == "fp16" and dims.world_size > 1:
        raise ConfigError(
            f"trainer.precision=fp16 with {dims.world_size} processes: loss scaling over sharded "
            "gradients is not supported; use trainer.precision=bf16 for parallel layouts"
        )


def build_plan(cfg: Config, dp_size: int = 1) -> BuildPlan:
    """What parallel/ builds on each rank for this run (`dp_size` data-parallel ranks)."""
    t = cfg.trainer
    return BuildPlan(
        model=cfg.model,
        parallel=cfg.parallel,
        precision=t.precision,
        activation_checkpointing=t.activation_checkpointing,
        checkpoint_every_n_blocks=t.checkpoint_every_n_blocks,
        compile=t.compile,
        micro_batches=micro_batches_per_step(cfg, dp_size),
        fp8=t.fp8,
    )
