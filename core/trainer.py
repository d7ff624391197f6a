"""The training loop, readable top to bottom.

One optimizer step = `micro_batches` forward/backward passes (gradient accumulation to
`trainer.global_batch_tokens`), global grad-norm clipping, an AdamW step on fp32 master
weights, and the scheduled learning rate. Metrics and evaluation run every few steps.

Faults (core/health.py, core/preemption.py): after clipping, one small all-reduce per step
tells every rank whether any loss or the grad norm was non-finite (the update is then
skipped or the run stops, `trainer.on_nonfinite`) and whether any rank received a
preemption signal (then `fit` saves a checkpoint and returns after that step); a loss-spike
detector reads the same reduced loss and only logs.

The per-step features (straggler timing, the hang watchdog, fault drills, profiler window,
throughput, MoE load balancing, loss spikes and skip warnings, preemption, checkpoint
cadence) are callbacks (core/callbacks/) whose hooks the
loop calls at fixed points; a callback with state is checkpointed under its `state_key`.

The same loop runs one process or many: it asks the `Topology` (parallel/topology.py) for
its data-parallel rank and size and its groups. The forward and backward of a step and the
evaluation forward belong to a train module (core/train_modules/): the plain one over the
whole model, or, with pipeline parallelism (`parallel.pp` > 1), the pipelined one over this
rank's stages; the loop sees only its `model_parts` (the model already sharded by parallel/),
and optimizer, clipping and logging are the same.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.stateful import Stateful

from scaleforge.core.callbacks import Callback
from scaleforge.core.callbacks.defaults import default_callbacks
from scaleforge.core.callbacks.hang_watchdog import enable_flight_recorder
from scaleforge.core.callbacks.snapshot import SnapshotCallback
from scaleforge.core.checkpoint.checkpointer import Checkpointer
from scaleforge.core.checkpoint.paths import choose_resume
from scaleforge.core.checkpoint.snapshots import snapshot_root
from scaleforge.core.checkpoint.state import frozen_names
from scaleforge.core.checkpoint.stateful import LossScaleState, RNGState
from scaleforge.core.checkpoint.weights import load_model_weights
from scaleforge.core.config import Config, build_plan, hang_timeout_s, validate
from scaleforge.core.health import (
    LossSpikeDetector,
    NonFiniteGuard,
    StepSignals,
    agree_on_step,
)
from scaleforge.core.lr_schedule import set_lr
from scaleforge.core.metrics import MetricsLogger
from scaleforge.core.optimizer import build_optimizer
from scaleforge.core.precision import build_precision, resolve_precision, set_numerics
from scaleforge.core.preemption import PreemptionWatch
from scaleforge.core.run_description import (
    describe_config_changes,
    describe_data,
    describe_fp8,
    describe_layout,
    describe_run,
)
from scaleforge.core.throughput import ThroughputMeter
from scaleforge.core.train_modules import ValidationSource, build_train_module
from scaleforge.data_pipeline.batch import Batch
from scaleforge.data_pipeline.loader import build_loaders
from scaleforge.parallel.collectives import broadcast_from_rank0, mean_over_dp_and_cp
from scaleforge.parallel.context_parallel import batch_columns
from scaleforge.parallel.data_parallel import autocast_precision
from scaleforge.parallel.expert_load import ExpertLoad
from scaleforge.parallel.grad_clip import clip_grad_norm
from scaleforge.parallel.parallelize import gathered_state_dict
from scaleforge.parallel.run_setup import init_topology, local_rank0_first
from scaleforge.parallel.topology import Topology


def start_topology(cfg: Config, world_size: int | None = None) -> Topology:
    """Validate `cfg` for `world_size` processes (every rule, once) and start this process's
    part of the layout: torch.distributed and the DeviceMesh when world_size > 1. Resolves
    `trainer.precision=auto` in place (`core.precision.resolve_precision`).

    `world_size` defaults to $WORLD_SIZE (torchrun sets it; 1 when run alone)."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", 1))
    cfg.trainer.precision = resolve_precision(cfg.trainer.precision, cfg.trainer.device)
    dims = validate(cfg, world_size)
    if hang_timeout_s(cfg) > 0:
        enable_flight_recorder()  # NCCL reads it when its process group starts
    return init_topology(cfg.parallel, dims, cfg.trainer.device)


def seed_everything(seed: int, deterministic: bool | None, device: torch.device,
                    tf32: bool = True) -> None:
    """Seed torch's generators and set the kernels' numerics for `device`
    (`core.precision.set_numerics`: deterministic by default on CPU, TF32 matmuls on CUDA)."""
    torch.manual_seed(seed)
    set_numerics(deterministic, tf32, device)


class Trainer:
    """Trains `cfg.model` on `cfg.data` in this process's part of the layout `cfg.parallel`,
    writing everything into `run_dir` (rank 0 writes; every rank uses rank 0's path)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        world_size: int = 1,
        data: tuple[Iterator[Batch], ValidationSource | None] | None = None,
        topology: Topology | None = None,
    ):
        """`data` = (training micro-batch iterator, validation loader with `.batches(n)`, or
        None for a trainer that never evaluates) of this rank's data-parallel replica; by
        default both come from `cfg.data` via `data_pipeline.build_loaders`. `topology` (made
        by `start_topology`, which validated `cfg`) defaults to `start_topology(cfg,
        world_size)`."""
        self.topology = topology or start_topology(cfg, world_size)
        self.cfg = cfg
        self.run_dir = Path(broadcast_from_rank0(self.topology, str(run_dir)))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.topology.is_rank0:
            OmegaConf.save(OmegaConf.structured(cfg), self.run_dir / "config.yaml")
        self.device = self.topology.device
        self.precision = build_precision(
            autocast_precision(cfg.trainer.precision, self.topology), self.device
        )
        plan = build_plan(cfg, self.topology.dp_size)
        self.micro_batches = plan.micro_batches

        self.data_summary: str | None = None  # a line about the data the run reads
        if data is None:
            loaders = local_rank0_first(
                self.topology,
                lambda: build_loaders(
                    cfg.data, cfg.trainer.micro_batch_size, self.topology.dp_rank,
                    self.topology.dp_size, accelerator=self.device.type == "cuda",
                )
            )
            data = (iter(loaders.train), loaders.val)
            self.data_summary = "\n".join(
                line for line in (describe_data(cfg, loaders.prepared.directories),
                                  *loaders.prepared.notes) if line) or None
        self.train_batches, self.val_loader = data

        seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, self.device,
                        cfg.trainer.tf32)
        self.train_module = build_train_module(
            plan, self.topology, self.precision, cfg.data.document_masking,
            batch_columns(self.topology, cfg.data.seq_len),  # this cp rank's chunks
        )
        self.model_parts = self.train_module.model_parts
        self.optimizer = build_optimizer(self.model_parts, cfg.optim, self.device.type,
                                         cfg.model)
        self.expert_load = ExpertLoad(self.model_parts, self.topology, cfg.model,
                                      self.micro_batches)
        self.throughput = ThroughputMeter(cfg.model, cfg.data.seq_len,
                                          cfg.trainer.global_batch_tokens, self.topology,
                                          cfg.trainer.precision)
        self.step = 0
        self.nonfinite_guard = NonFiniteGuard(cfg.trainer, cfg.optim.lr, cfg.optim.grad_clip)
        self.spike_detector = LossSpikeDetector(cfg.trainer.spike_zscore,
                                                cfg.trainer.spike_warmup_steps)
        self.preemption = PreemptionWatch(cfg.trainer.preemption_signals)
        self.last_step_signals: StepSignals | None = None
        self.skipped: str | None = None  # the non-finite value that made the last step skip
        self.stop_requested = False  # set after a step by PreemptionCallback
        self.stop_reason: str | None = None  # why, when not a signal (a straggler)
        self.preempted = False
        self.snapshots = SnapshotCallback(cfg.checkpoint.snapshot_every,
                                          snapshot_root(cfg, self.run_dir))
        # The per-step features, in the order their hooks run (core/callbacks/).
        self.callbacks: list[Callback] = default_callbacks(self)
        self.checkpointer = Checkpointer(
            cfg, self.run_dir, self.topology,
            model=self.model_parts,
            optimizer=self.optimizer,
            loader=self.train_batches if isinstance(self.train_batches, Stateful) else None,
            rng=RNGState(self.device),
            parts=self._checkpoint_parts(),
        )
        self.snapshots.attach(self.checkpointer, cfg, self.device)
        self.resumed_from = self.snapshots.resume_point(
            choose_resume(cfg.trainer.resume, self.run_dir, self.topology), cfg.trainer.resume)
        self.initialised_from = None
        # A model with frozen weights (LoRA) checkpoints what trains; the frozen rest comes
        # from trainer.init_from on a resume too.
        frozen = bool(frozen_names(self.model_parts))
        if cfg.trainer.init_from and (self.resumed_from is None or frozen):
            self.initialised_from = load_model_weights(
                self.model_parts, cfg.trainer.init_from, "trainer.init_from", cfg.model,
                "frozen",
            )
        if self.resumed_from is not None:
            self.step = self.checkpointer.load(self.resumed_from)

    def _checkpoint_parts(self) -> dict[str, Stateful]:
        """What a checkpoint keeps besides model, optimizer, loader and RNG, by key: the
        non-finite guard's count, the fp16 loss scale, and each callback's state."""
        parts: dict[str, Stateful] = {"health.nonfinite": self.nonfinite_guard}
        scaler = self.precision.scaler
        if scaler is not None and scaler.is_enabled():
            parts["scaler"] = LossScaleState(scaler)
        parts.update({callback.state_key: callback for callback in self.callbacks
                      if callback.state_key is not None})
        return parts

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step into RUN_DIR/checkpoints/step_<N>/ (collective: every
        rank calls it at the same step). With checkpoint.async_save the write goes on in the
        background; the directory appears, complete, when it is done."""
        return self.checkpointer.save(self.step)

    @property
    def step_signals(self) -> StepSignals:
        """What every rank agreed on in the last `train_step` (see `agree_on_step`)."""
        if self.last_step_signals is None:
            raise RuntimeError("no training step has been taken yet")
        return self.last_step_signals

    def train_step(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `self.micro_batches` micro-batches from `batches`.

        Returns (this replica's mean loss, global grad norm before clipping) as device
        tensors. Before the update, `agree_on_step` runs one all-reduce of three floats over
        the world and the step's only device-to-host read (`core.health.read_on_host`, also
        in one process; nothing else here waits for the device), stored in
        `self.last_step_signals`: with a non-finite loss or grad norm the update is skipped
        (`self.skipped` names the value; weights and optimizer state unchanged, the step and
        its data still count) or TrainingDivergedError is raised (`trainer.on_nonfinite`).
        """
        for callback in self.callbacks:
            callback.pre_step(self)
            batches = callback.step_batches(self, batches)
        self.model_parts.train()
        set_lr(self.optimizer, self.step, self.cfg.optim, self.cfg.trainer.max_steps)
        scaler = self.precision.scaler
        total_loss = self.train_module.step(batches)
        for callback in self.callbacks:
            callback.pre_optim_step(self)
        if scaler:
            scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(self.model_parts.parameters(), max_norm,
                                   self.topology.pp_group)
        signals = agree_on_step(self.topology, total_loss, grad_norm,
                                self.preemption.requested is not None)
        self.last_step_signals = signals
        self.skipped = self.nonfinite_guard.check(self.step + 1, signals, scaler is not None)
        if scaler:
            if not self.skipped:
                scaler.step(self.optimizer)  # skips by itself on infinite gradients
            scaler.update()
        elif not self.skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for callback in self.callbacks:
            callback.post_optim_step(self)
        self.step += 1
        return total_loss, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first `trainer.eval_batches` validation micro-batches
        (shared out over data-parallel ranks; the same number as in one process)."""
        if self.val_loader is None:
            raise RuntimeError("this Trainer was given no validation data to evaluate on")
        self.model_parts.eval()
        return self.train_module.evaluate(self.val_loader, self.cfg.trainer.eval_batches).item()

    def val_metrics(self) -> dict[str, float]:
        """`evaluate()` as metrics: the validation loss and perplexity."""
        val_loss = self.evaluate()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def fit(self, logger: MetricsLogger | None = None) -> dict:
        """Train for `trainer.max_steps` steps; return the last logged record.

        While it runs, the signals in `trainer.preemption_signals` (main thread only) make
        every rank stop after the same step, save a checkpoint (`save_checkpoint`) and
        return with `self.preempted` set; the previous handlers are restored on return.
        """
        with self.preemption:
            return self._fit(logger)

    def _fit(self, logger: MetricsLogger | None) -> dict:
        own_logger = logger is None
        logger = logger or MetricsLogger(
            self.run_dir, self.cfg.logging, asdict(self.cfg), self.cfg.trainer.max_steps,
            is_rank0=self.topology.is_rank0,
        )
        try:
            record = self._start(logger)
            try:
                record = self._train(logger, record)
            finally:
                for callback in self.callbacks:
                    callback.post_train(self)
            if self.stop_requested:
                self._stop_for_preemption(logger)
            else:
                self._finish(logger)
        finally:  # a diverged run's metrics and W&B run are closed before its error exit
            if own_logger:
                logger.close()
        return record

    def _start(self, logger: MetricsLogger) -> dict:
        """The start-up lines; on a fresh start the step-0 record (with its evaluation);
        returns the record that stands for the starting step."""
        logger.message(describe_run(self))
        if self.data_summary:
            logger.message(self.data_summary)
        if fp8 := describe_fp8(self):
            logger.message(fp8)
        if self.topology.is_distributed:
            logger.message(describe_layout(self))
        if self.resumed_from is not None:
            logger.message(f"resumed from {self.resumed_from} at step {self.step}")
            if changed := describe_config_changes(self.resumed_from / "config.yaml", self.cfg):
                logger.message(changed)
            logger.resume_at(self.step)
            return {"step": self.step}
        if self.initialised_from is not None:
            logger.message(f"weights from {self.initialised_from}")
        record = {"step": 0, **(self.val_metrics() if self.cfg.trainer.evaluates_at(0) else {})}
        logger.log(record)
        return record

    def _train(self, logger: MetricsLogger, record: dict) -> dict:
        """Steps until `trainer.max_steps` or a preemption; returns the last logged record.
        A step is logged every `trainer.log_every` steps, at evaluations, at the last step,
        and when a callback reports an event or asks to stop."""
        cfg = self.cfg.trainer
        start, start_step = time.perf_counter(), self.step
        for callback in self.callbacks:
            callback.pre_train(self)
        while self.step < cfg.max_steps:
            loss, grad_norm = self.train_step(self.train_batches)
            logger.advance()
            events: dict[str, bool] = {}
            for callback in self.callbacks:
                events |= callback.post_step(self, logger)
            is_eval = cfg.evaluates_at(self.step)
            last = self.step == cfg.max_steps  # logged even when evaluation is off
            if (self.step % cfg.log_every == 0 or is_eval or last or events
                    or self.stop_requested):
                record = self._record(loss, grad_norm, start, start_step)
                if is_eval:
                    record |= self.val_metrics()
                logger.log(record | events)
                if self.stop_requested:
                    break
                for callback in self.callbacks:
                    callback.post_log(self)
            for callback in self.callbacks:
                callback.end_step(self, logger)
        return record

    def _record(self, loss: torch.Tensor, grad_norm: torch.Tensor, start: float,
                start_step: int) -> dict:
        """The metrics record of the step just taken, the loop having started at `start`
        (perf_counter) from step `start_step`. Collective: its reads reduce over ranks."""
        cfg = self.cfg.trainer
        extra: dict = {}
        for callback in self.callbacks:  # speed and memory (waits for the device), MoE, ...
            extra |= callback.metrics(self)
        elapsed = time.perf_counter() - start
        return {
            "step": self.step,
            "loss": mean_over_dp_and_cp(self.topology, loss).item(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm.item(),
            "tokens": self.step * cfg.global_batch_tokens,
            **extra,
            "elapsed_s": elapsed,
            "eta_s": elapsed / (self.step - start_step) * (cfg.max_steps - self.step),
        }

    def _save_and_wait(self) -> Path:
        """Save a checkpoint at this step (every rank, collectively) and wait until it is
        complete on disk, also with checkpoint.async_save: rank 0 renames an async save in
        `wait`, so no rank may exit (and let its launcher end the job) before that."""
        path = self.save_checkpoint()
        self.checkpointer.wait()
        if self.topology.is_distributed:
            dist.barrier()
        return path

    def _finish(self, logger: MetricsLogger) -> None:
        """The end of a complete run: the last checkpoint and the final weights."""
        if self.cfg.checkpoint.at_end or self.cfg.checkpoint.every:
            logger.message(f"checkpoint: {self._save_and_wait()}")
        if self.cfg.trainer.save_final_weights:
            path = self.run_dir / "final_model.pt"
            state = gathered_state_dict(self.model_parts, self.topology)
            if self.topology.is_rank0:
                torch.save(state, path)
            logger.message(f"final weights: {path}")

    def _stop_for_preemption(self, logger: MetricsLogger) -> None:
        """Save a checkpoint at this step and end the run (`self.preempted` set)."""
        path = self._save_and_wait()
        received = self.preemption.requested
        source = received.name if received is not None else "a signal on another rank"
        why = f"stopped for {self.stop_reason}" if self.stop_reason else f"preempted by {source}"
        logger.message(
            f"{why}: stopped after step {self.step} and saved checkpoint "
            f"{path}; start again with trainer.resume=auto to continue"
        )
        self.preempted = True
