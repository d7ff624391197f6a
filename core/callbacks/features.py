"""The trainer's per-step features as callbacks (core/callbacks/__init__.py): the profiler
window, the throughput interval, MoE load balancing and metrics, the loss-spike detector
and the non-finite skip warning, preemption and the checkpoint cadence."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scaleforge.core.callbacks import Callback
from scaleforge.core.health import LossSpikeDetector
from scaleforge.core.metrics import MetricsLogger
from scaleforge.core.profiling import StepProfiler
from scaleforge.core.throughput import ThroughputMeter
from scaleforge.parallel.expert_load import ExpertLoad
from scaleforge.parallel.float8 import precompute_scales

if TYPE_CHECKING:
    from scaleforge.core.trainer import Trainer


class ProfilerCallback(Callback):
    """Profiles the steps `trainer.profile_steps` names (core/profiling.py)."""

    def __init__(self, profiler: StepProfiler):
        self.profiler = profiler

    def pre_step(self, trainer: Trainer) -> None:
        self.profiler.before_step(trainer.step + 1)

    def post_step(self, trainer: Trainer, logger: MetricsLogger) -> dict[str, bool]:
        if trace := self.profiler.after_step(trainer.step):
            logger.message(f"profile: {trace} (rank 0's; each rank writes its own)")
        return {}


class ThroughputCallback(Callback):
    """Speed and memory of the steps since the last logged one (core/throughput.py): tokens/s,
    TFLOP/s per GPU and total, MFU, GiB. The interval starts at `fit` and after each logged
    record, so evaluation and logging are not counted."""

    def __init__(self, meter: ThroughputMeter):
        self.meter = meter

    def pre_train(self, trainer: Trainer) -> None:
        self.meter.restart()  # after start-up and the first evaluation

    def post_step(self, trainer: Trainer, logger: MetricsLogger) -> dict[str, bool]:
        self.meter.step()
        return {}

    def metrics(self, trainer: Trainer) -> dict[str, Any]:
        return self.meter.read()

    def post_log(self, trainer: Trainer) -> None:
        self.meter.restart()


class ExpertLoadCallback(Callback):
    """MoE: the expert-bias update after every update, and the aux loss, expert load and
    dropped tokens in the record (parallel/expert_load.py); nothing for a dense model."""

    def __init__(self, expert_load: ExpertLoad):
        self.expert_load = expert_load

    def post_optim_step(self, trainer: Trainer) -> None:
        self.expert_load.step()

    def metrics(self, trainer: Trainer) -> dict[str, Any]:
        return self.expert_load.metrics()


class Float8ScalesCallback(Callback):
    """trainer.fp8=tensorwise under FSDP's float8 all-gather (parallel/float8.py): after
    every update, the scales of all float8 weights in one all-reduce (torchao's precompute),
    instead of one per weight at the next all-gather; nothing otherwise."""

    def __init__(self, gathers_in_float8: bool):
        self.gathers_in_float8 = gathers_in_float8

    def post_optim_step(self, trainer: Trainer) -> None:
        if self.gathers_in_float8:
            precompute_scales(trainer.model_parts)


class HealthCallback(Callback):
    """Warns about a step whose update was skipped (non-finite loss or grad norm; the
    trainer's `NonFiniteGuard` decides) or whose loss spiked (`LossSpikeDetector`, whose
    running statistics are checkpointed); both become events of the record."""

    state_key = "health.spikes"

    def __init__(self, spike_detector: LossSpikeDetector, spike_zscore: float):
        self.spike_detector = spike_detector
        self.spike_zscore = spike_zscore

    def post_step(self, trainer: Trainer, logger: MetricsLogger) -> dict[str, bool]:
        events = {}
        if trainer.skipped:
            guard = trainer.nonfinite_guard
            logger.message(
                f"warning: step {trainer.step}: non-finite {trainer.skipped}; update skipped "
                f"({guard.consecutive_skips} in a row, trainer.max_skipped_steps="
                f"{guard.max_skipped_steps} stops the run)"
            )
            events["skipped"] = True
        loss = trainer.step_signals.mean_loss
        mean = self.spike_detector.mean
        if self.spike_detector.update(loss):
            logger.message(
                f"warning: step {trainer.step}: loss spike {loss:.4f} (running mean "
                f"{mean:.4f}, trainer.spike_zscore={self.spike_zscore})"
            )
            events["loss_spike"] = True
        return events

    def state_dict(self) -> dict[str, Any]:
        return self.spike_detector.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spike_detector.load_state_dict(state)


class PreemptionCallback(Callback):
    """A step after which any rank had received one of `trainer.preemption_signals` (every
    rank agrees, from the step's all-reduce; `fit` catches the signals, core/preemption.py)
    sets `trainer.stop_requested`: the loop saves a checkpoint and returns."""

    def post_step(self, trainer: Trainer, logger: MetricsLogger) -> dict[str, bool]:
        # A signal during the last step changes nothing: the run ends normally.
        trainer.stop_requested = (trainer.step_signals.preemption_requested
                                  and trainer.step < trainer.cfg.trainer.max_steps)
        return {}


class CheckpointCallback(Callback):
    """Finishes an async save whose write is done, and saves every `checkpoint.every` steps
    (not at the last step, which `fit` saves, nor when stopping, which saves anyway), after
    the step's record, so the console shows step N's line before its checkpoint's."""

    def end_step(self, trainer: Trainer, logger: MetricsLogger) -> None:
        trainer.checkpointer.poll()
        every = trainer.cfg.checkpoint.every
        step, max_steps = trainer.step, trainer.cfg.trainer.max_steps
        if every and step % every == 0 and step < max_steps and not trainer.stop_requested:
            logger.message(f"checkpoint: {trainer.save_checkpoint()}")
