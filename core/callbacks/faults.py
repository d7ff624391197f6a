"""Fault drills in the training loop: the faults `SCALEFORGE_INJECT_FAULT` names
(core/fault_injection.py), carried out on their rank. Inert when the variable is unset."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from scaleforge.core.callbacks import Callback
from scaleforge.core.fault_injection import Fault, first_attempt
from scaleforge.parallel.collectives import PROGRESS

if TYPE_CHECKING:
    from scaleforge.core.trainer import Trainer


class FaultInjectionCallback(Callback):
    """This rank's injected faults: `kill` sends SIGKILL to this process as its step starts;
    `hang` sleeps, without end, before this rank joins the first collective of its step
    (`parallel.collectives.PROGRESS.before_join`), as a rank stuck ahead of a collective
    does, or with `at=start` as its step starts; `slow` spins after each step's optimizer
    update for (factor - 1) x the CPU time the step took, as a slower chip would. hang and
    kill fire in a job's first attempt only."""

    def __init__(self, faults: list[Fault], rank: int):
        first = first_attempt()
        mine = [fault for fault in faults if fault.rank == rank]
        self.kill_steps = {f.step for f in mine if f.kind == "kill" and first}
        hangs = [f for f in mine if f.kind == "hang" and first]
        self.hang_steps = {f.step for f in hangs if f.at == "collective"}
        self.hang_start_steps = {f.step for f in hangs if f.at == "start"}
        self.slow = [f for f in mine if f.kind == "slow"]
        self.step = 0  # the step running now (1-based)
        self.step_cpu_start = 0.0

    def pre_train(self, trainer: Trainer) -> None:
        if self.hang_steps:
            PROGRESS.before_join.append(self._hang_before_join)

    def post_train(self, trainer: Trainer) -> None:
        if self._hang_before_join in PROGRESS.before_join:
            PROGRESS.before_join.remove(self._hang_before_join)

    def pre_step(self, trainer: Trainer) -> None:
        self.step = trainer.step + 1
        self.step_cpu_start = time.thread_time()
        if self.step in self.kill_steps:
            _announce(f"kill:rank={trainer.topology.rank}:step={self.step}")
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step in self.hang_start_steps:
            _announce(f"hang:step={self.step} at its start")
            _sleep_forever()

    def post_optim_step(self, trainer: Trainer) -> None:
        factor = max((f.factor for f in self.slow if self.step >= f.step), default=1.0)
        if factor > 1:
            extra = (factor - 1) * (time.thread_time() - self.step_cpu_start)
            until = time.thread_time() + extra
            while time.thread_time() < until:  # CPU work, not a sleep: a slower chip
                pass

    def _hang_before_join(self, collective: str) -> None:
        if self.step in self.hang_steps:
            self.hang_steps.discard(self.step)
            _announce(f"hang:step={self.step} before joining {collective}")
            _sleep_forever()


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


def _announce(what: str) -> None:
    """One line on stderr as a fault fires (drills time their detection from it)."""
    print(f"{time.time():.3f} SCALEFORGE_INJECT_FAULT fires: {what}", file=sys.stderr,
          flush=True)
