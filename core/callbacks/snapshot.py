"""Fast-recovery snapshots every `checkpoint.snapshot_every` steps (core/checkpoint/
snapshots.py): a synchronous checkpoint into node-local storage, then each rank's files
copied to its peer's folder. Not at a step that saves a checkpoint anyway."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from scaleforge.core.callbacks import Callback
from scaleforge.core.checkpoint.checkpointer import Checkpointer
from scaleforge.core.checkpoint.snapshots import copy_to_peer
from scaleforge.core.metrics import MetricsLogger

if TYPE_CHECKING:
    from scaleforge.core.trainer import Trainer


class SnapshotCallback(Callback):
    """Takes the snapshots; after a resume from one, prints when training runs again."""

    def __init__(self, every: int, root: Path):
        self.every = every
        self.root = root
        self.checkpointer: Checkpointer | None = None  # set by the trainer once built
        self.resumed_snapshot_time: float | None = None  # when the snapshot resumed was taken

    def post_step(self, trainer: Trainer, logger: MetricsLogger) -> dict[str, bool]:
        if self.resumed_snapshot_time is not None:
            now = time.time()
            logger.message(
                f"recovery: training again at {now:.3f} (step {trainer.step} done), "
                f"{now - self.resumed_snapshot_time:.1f} s after the snapshot it resumed from "
                "was written")
            self.resumed_snapshot_time = None
        step, cfg = trainer.step, trainer.cfg
        durable = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
        if (not self.every or step % self.every or step >= cfg.trainer.max_steps or durable
                or trainer.stop_requested or self.checkpointer is None):
            return {}
        self.checkpointer.save(step)
        copy_to_peer(self.root, step, trainer.topology.rank, trainer.topology.world_size)
        return {}
