"""Per-step features as callbacks (OLMo-core's pattern): the training loop calls each
callback's hooks at fixed points of a run, and a new per-step feature is a new class here
plus a line in `default_callbacks`, never an edit of the loop.

Hooks, in the order the loop calls them (each a no-op unless a callback overrides it):

    pre_train(trainer)            `fit`'s loop starts (after start-up and the first evaluation)
    pre_step(trainer)             a training step starts (the profiler's window opens)
    step_batches(trainer, it)     the step's micro-batch iterator, returned (or wrapped,
                                  e.g. to time the data wait)
    pre_optim_step(trainer)       the step's forward and backward are done (before clipping)
    post_optim_step(trainer)      after the step's optimizer update (MoE load balancing)
    post_step(trainer, logger)    in `fit`, after the step: warnings, cadence; returns events
                                  for the metrics record (a step with events is logged)
    metrics(trainer)              in `fit`, on a logged step: fields for the record
    post_log(trainer)             in `fit`, after that record is written
    end_step(trainer, logger)     in `fit`, last, every step (checkpoint cadence: a save's
                                  line follows its step's line)
    post_train(trainer)           `fit`'s loop has ended, also by an error (before the final
                                  saves): threads a callback started stop here

A callback whose state must survive a restart names a `state_key` (dotted: "health.spikes"
is saved as health.spikes.<name>); the checkpointer saves its `state_dict()` there and
restores it on resume, without knowing what it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from scaleforge.core.metrics import MetricsLogger
from scaleforge.data_pipeline.batch import Batch

if TYPE_CHECKING:
    from scaleforge.core.trainer import Trainer


class Callback:
    """A per-step feature; every hook does nothing until overridden (see the module doc)."""

    # Where a checkpoint keeps this callback's state; None: it keeps none.
    state_key: str | None = None

    def pre_train(self, trainer: Trainer) -> None:
        """`fit`'s loop starts."""

    def pre_step(self, trainer: Trainer) -> None:
        """Step `trainer.step + 1` starts."""

    def step_batches(self, trainer: Trainer, batches: Iterator[Batch]) -> Iterator[Batch]:
        """The iterator the step takes its micro-batches from (`batches` unless wrapped)."""
        return batches

    def pre_optim_step(self, trainer: Trainer) -> None:
        """The step's forward and backward are done; clipping and the update follow."""

    def post_optim_step(self, trainer: Trainer) -> None:
        """The step's optimizer update is done (`trainer.step` not yet advanced)."""

    def post_step(self, trainer: Trainer, logger: MetricsLogger) -> dict[str, bool]:
        """Step `trainer.step` is done (in `fit`); returns its events for the record."""
        return {}

    def metrics(self, trainer: Trainer) -> dict[str, Any]:
        """Fields of the metrics record of a logged step (collective where it reduces)."""
        return {}

    def post_log(self, trainer: Trainer) -> None:
        """A logged step's record is written."""

    def end_step(self, trainer: Trainer, logger: MetricsLogger) -> None:
        """Step `trainer.step` is done and, where it was due, logged (in `fit`)."""

    def post_train(self, trainer: Trainer) -> None:
        """`fit`'s loop has ended (normally, to stop, or by an error)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback (tensors); {} without a `state_key`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`."""
