"""Preemption signals: SLURM (and most schedulers) send SIGTERM or a chosen signal such as
SIGUSR1 before they kill a job. While `fit` runs, the handler only records that a signal
came; the training loop reads the record after each step, agrees on it with every rank
(`core.health.agree_on_step`), saves a checkpoint and returns.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from scaleforge.errors import ConfigError

# Signals a process cannot catch, or that mean a fault rather than a request to stop.
UNCATCHABLE = {"SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL"}


def parse_signals(names: Sequence[str], setting: str) -> list[signal.Signals]:
    """The signals named in `names` (e.g. ["SIGTERM", "SIGUSR1"]); ConfigError naming
    `setting` for a name that is not a catchable signal on this platform."""
    signals = []
    for name in names:
        if name in UNCATCHABLE or not hasattr(signal.Signals, name):
            raise ConfigError(
                f"{setting} contains {name!r}, which is not a catchable signal name; use "
                "names such as SIGTERM, SIGUSR1, SIGUSR2 or SIGINT (or [] for none)"
            )
        signals.append(signal.Signals[name])
    return signals


class PreemptionWatch:
    """A context manager that, in the main thread, routes the given signals to a handler
    setting `requested` (the signal received, or None), and restores the previous handlers
    on exit. Outside the main thread (where Python cannot install handlers) it does
    nothing and `installed` stays False.
    """

    def __init__(self, names: Sequence[str]):
        self.signals = parse_signals(names, "trainer.preemption_signals")
        self.requested: signal.Signals | None = None
        self.installed = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs between bytecodes of the main thread: record only; the loop does the work.
        self.requested = signal.Signals(signum)

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not set from Python; the default is the best guess.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        self.installed = False
