"""Straggler detection: every rank times its steps and their parts; every
`trainer.log_every` steps one small all-gather (`parallel.collectives.gather_from_world`, a
few floats per rank, the only synchronisation added) brings every rank's interval to every
rank, and a rank whose compute time per step exceeds the median rank's by
`trainer.straggler_ratio` for `STRAGGLER_INTERVALS` intervals in a row is named in the log
and the record; `trainer.on_straggler=stop` then saves a checkpoint and ends the run, as a
preemption does, so the scheduler can replace the node.

What is timed per step (core/callbacks/step_timing.py): `step_s` (wall time; in a
synchronous job every rank's is about the same, the fast ranks wait for the slow one in the
step's collectives), `data_s`, `forward_backward_s`, `optimizer_s`, `compute_s` and, on
the CPU, `exposed_comm_s`. On the CPU `compute_s` is the training thread's CPU time, which
waiting in a gloo collective or for data does not advance, and the rule compares it. On CUDA
the parts are timed with CUDA events read once per interval; they include the stream's waits
for collectives, so there the rule compares `step_s`, which names a rank only when its
slowness is not hidden behind a collective.
Each rank's numbers are in the record of every interval: `<part>/rank<R>` (a W&B or
TensorBoard panel per key), and `straggler_ranks` when named.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from scaleforge.core.callbacks import Callback
from scaleforge.core.callbacks.step_timing import StepTimer, TimedBatches
from scaleforge.core.metrics import MetricsLogger
from scaleforge.data_pipeline.batch import Batch
from scaleforge.parallel.collectives import gather_from_world

if TYPE_CHECKING:
    from scaleforge.core.trainer import Trainer

# Intervals in a row a rank must be slow for before it is named.
STRAGGLER_INTERVALS = 3


class StragglerCallback(Callback):
    """Times this rank's steps and names stragglers every `log_every` steps (module doc).
    `ratio` 0 turns the comparison off (the per-rank times are still recorded)."""

    def __init__(self, ratio: float, on_straggler: str, log_every: int, cuda: bool):
        self.ratio = ratio
        self.on_straggler = on_straggler
        self.log_every = log_every
        self.cuda = cuda
        self.timer = StepTimer(cuda)
        self.slow_intervals: dict[int, int] = {}  # rank -> slow intervals in a row
        self.logger: MetricsLogger | None = None

    def pre_step(self, trainer: Trainer) -> None:
        self.timer.start()

    def step_batches(self, trainer: Trainer, batches: Iterator[Batch]) -> Iterator[Batch]:
        return TimedBatches(batches, self.timer)

    def pre_optim_step(self, trainer: Trainer) -> None:
        self.timer.backward_done()

    def post_optim_step(self, trainer: Trainer) -> None:
        self.timer.update_done()

    def post_step(self, trainer: Trainer, logger: MetricsLogger) -> dict[str, bool]:
        self.timer.end()
        self.logger = logger
        return {}

    def metrics(self, trainer: Trainer) -> dict[str, Any]:
        # Every rank logs the steps that are multiples of log_every, so all join the gather.
        if trainer.step % self.log_every or not self.timer.steps:
            return {}
        means = self.timer.read()
        assert means is not None
        local = torch.tensor(list(means.values()), dtype=torch.float64, device=trainer.device)
        per_rank = gather_from_world(trainer.topology, local).tolist()
        record: dict[str, Any] = {}
        for rank, row in enumerate(per_rank):
            for part, seconds in zip(means, row, strict=True):
                record[f"{part}/rank{rank}"] = seconds
        if self.ratio > 0 and len(per_rank) > 1:
            judged = list(means).index("step_s" if self.cuda else "compute_s")
            named = self._judge([row[judged] for row in per_rank], trainer)
            if named:
                record["straggler_ranks"] = named
        return record

    def _judge(self, times: list[float], trainer: Trainer) -> list[int]:
        """Update each rank's run of slow intervals; name (and act on) those at the limit."""
        median = statistics.median(times)
        for rank, seconds in enumerate(times):
            slow = median > 0 and seconds > self.ratio * median
            self.slow_intervals[rank] = self.slow_intervals.get(rank, 0) + 1 if slow else 0
        named = [rank for rank, count in self.slow_intervals.items()
                 if count >= STRAGGLER_INTERVALS]
        what = "step" if self.cuda else "compute (CPU) time per step"
        for rank in named:
            if self.logger is not None:
                self.logger.message(
                    f"straggler: rank {rank} took {times[rank] / median:.2f}x the median "
                    f"{what} ({times[rank]:.4f} s vs {median:.4f} s) for "
                    f"{self.slow_intervals[rank]} log intervals in a row "
                    f"(trainer.straggler_ratio={self.ratio:g}, "
                    f"trainer.on_straggler={self.on_straggler})"
                )
        if named and self.on_straggler == "stop":
            trainer.stop_requested = True
            trainer.stop_reason = f"straggler rank{'s' if len(named) > 1 else ''} " + \
                ", ".join(map(str, named))
        return named
