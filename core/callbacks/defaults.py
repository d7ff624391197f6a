"""The callbacks every training run has, in the order their hooks run
(core/callbacks/__init__.py): a new per-step feature is a class in core/callbacks/ and a
line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scaleforge.core.callbacks import Callback
from scaleforge.core.callbacks.faults import FaultInjectionCallback
from scaleforge.core.callbacks.features import (
    CheckpointCallback,
    ExpertLoadCallback,
    Float8ScalesCallback,
    HealthCallback,
    PreemptionCallback,
    ProfilerCallback,
    ThroughputCallback,
)
from scaleforge.core.callbacks.hang_watchdog import HangWatchdogCallback
from scaleforge.core.callbacks.straggler import StragglerCallback
from scaleforge.core.config import hang_timeout_s
from scaleforge.core.fault_injection import injected_faults
from scaleforge.core.profiling import StepProfiler
from scaleforge.parallel.float8 import gathers_weights_in_float8

if TYPE_CHECKING:
    from scaleforge.core.trainer import Trainer


def default_callbacks(trainer: Trainer) -> list[Callback]:
    """The per-step features of `trainer`'s run, built from its config and its parts
    (throughput meter, expert load, spike detector, snapshots), snapshots last."""
    cfg, topology = trainer.cfg, trainer.topology
    t = cfg.trainer
    return [
        StragglerCallback(t.straggler_ratio, t.on_straggler, t.log_every,
                          trainer.device.type == "cuda"),
        HangWatchdogCallback(hang_timeout_s(cfg), trainer.run_dir, topology.rank,
                             topology.world_size),
        FaultInjectionCallback(injected_faults(), topology.rank),
        ProfilerCallback(StepProfiler(t.profile_steps, trainer.run_dir, topology.rank,
                                      trainer.device)),
        ThroughputCallback(trainer.throughput),
        ExpertLoadCallback(trainer.expert_load),
        Float8ScalesCallback(gathers_weights_in_float8(t.fp8, topology)),
        HealthCallback(trainer.spike_detector, t.spike_zscore),
        PreemptionCallback(),
        CheckpointCallback(),
        trainer.snapshots,
    ]
