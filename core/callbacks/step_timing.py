"""The parts of a rank's step time, summed over a log interval, for the straggler callback.

Per step, in seconds:

    step_s              wall time from the step's start to its end (host clock)
    data_s              waiting for the next micro-batch (host clock, in `next(batches)`)
    forward_backward_s  forward and backward of the step's micro-batches, data wait excluded
    optimizer_s         gradient clipping, the step's agreement all-reduce and the update
    compute_s           CPU: the training thread's CPU time (waiting in a collective or for
                        data does not advance it); CUDA: forward_backward_s + optimizer_s
    exposed_comm_s      CPU only: step_s - compute_s - data_s, the time the thread was
                        blocked outside data loading (collectives not hidden by compute)

On the CPU the parts come from host clocks. On CUDA forward_backward_s and optimizer_s are
timed with CUDA events recorded on the current stream at the step's start, after the
backward and after the update: recording costs no synchronisation, and the events are read
only when the interval's figures are gathered (`read`, every `trainer.log_every` steps,
where the straggler's all-gather waits for the device anyway). They are the stream's time,
which includes the stream's waits for collectives on other streams (FSDP's all-gathers,
gradient reductions): on CUDA the exposed communication is not separated from compute, and
is left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

PARTS = ("step_s", "data_s", "forward_backward_s", "optimizer_s", "compute_s",
         "exposed_comm_s")
CUDA_PARTS = PARTS[:-1]


def cuda_event() -> Any:
    """A CUDA event that records time."""
    return torch.cuda.Event(enable_timing=True)


class TimedBatches:
    """`batches` with the time spent in `next` added to `timer.data_s`."""

    def __init__(self, batches: Iterator[Any], timer: StepTimer):
        self.batches = batches
        self.timer = timer

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.timer.data_s += time.perf_counter() - start


class StepTimer:
    """Sums the parts of each step (module doc) until `read`. `cuda` times forward-backward
    and the optimizer with events made by `make_event` (CUDA events; a test may pass
    others with `record`, `synchronize` and `elapsed_time` in milliseconds)."""

    def __init__(self, cuda: bool, make_event: Callable[[], Any] = cuda_event):
        self.cuda = cuda
        self.make_event = make_event
        self.parts = CUDA_PARTS if cuda else PARTS
        self.sums = dict.fromkeys(PARTS, 0.0)
        self.steps = 0
        self.data_s = 0.0  # this step's data wait so far (TimedBatches adds to it)
        self.step_start = self.cpu_start = self.backward_end = 0.0
        self.events: list[tuple[Any, Any, Any]] = []  # (start, backward end, update end)
        self.spare: list[Any] = []

    def _record(self) -> Any:
        event = self.spare.pop() if self.spare else self.make_event()
        event.record()
        return event

    def start(self) -> None:
        """The step starts."""
        self.data_s = 0.0
        self.step_start = time.perf_counter()
        self.cpu_start = time.thread_time()
        if self.cuda:
            self.events.append((self._record(), None, None))

    def backward_done(self) -> None:
        """The step's forward and backward are done; clipping and the update follow."""
        self.backward_end = time.perf_counter()
        if self.cuda and self.events:
            self.events[-1] = (self.events[-1][0], self._record(), None)

    def update_done(self) -> None:
        """The optimizer update is done."""
        now = time.perf_counter()
        if self.cuda:
            if self.events:
                start, backward, _ = self.events[-1]
                self.events[-1] = (start, backward, self._record())
            return
        self.sums["forward_backward_s"] += self.backward_end - self.step_start - self.data_s
        self.sums["optimizer_s"] += now - self.backward_end

    def end(self) -> None:
        """The step ends (after the loop's per-step work)."""
        step_s = time.perf_counter() - self.step_start
        self.sums["step_s"] += step_s
        self.sums["data_s"] += self.data_s
        if not self.cuda:
            compute_s = time.thread_time() - self.cpu_start
            self.sums["compute_s"] += compute_s
            self.sums["exposed_comm_s"] += max(0.0, step_s - compute_s - self.data_s)
        self.steps += 1

    def read(self) -> dict[str, float] | None:
        """The mean of each part per step since the last read (None without steps), and a
        fresh interval. On CUDA it waits for the interval's last event."""
        if not self.steps:
            return None
        if self.cuda:
            self._add_event_times()
        means = {part: self.sums[part] / self.steps for part in self.parts}
        self.sums = dict.fromkeys(PARTS, 0.0)
        self.steps = 0
        return means

    def _add_event_times(self) -> None:
        complete = [times for times in self.events if times[2] is not None]
        if complete:
            complete[-1][2].synchronize()
        for start, backward, update in complete:
            forward_backward = start.elapsed_time(backward) / 1e3
            optimizer = backward.elapsed_time(update) / 1e3
            self.sums["forward_backward_s"] += forward_backward
            self.sums["optimizer_s"] += optimizer
            self.sums["compute_s"] += forward_backward + optimizer
        self.sums["forward_backward_s"] = max(0.0, self.sums["forward_backward_s"]
                                              - self.sums["data_s"])
        self.sums["compute_s"] = max(0.0, self.sums["compute_s"] - self.sums["data_s"])
        for times in self.events:
            self.spare.extend(event for event in times if event is not None)
        self.events = []
