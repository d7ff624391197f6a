"""Fast-recovery snapshots every `checkpoint.snapshot_every` steps (core/checkpoint/
snapshots.py): the state copied to host memory at the step's end, then written into
node-local storage and copied to the peer's folder in the background
(core/checkpoint/snapshot_writer.py). Not at a step that saves a checkpoint anyway. On a
start with `trainer.resume=auto` the newest snapshot every rank can reach is resumed when
it is newer than the newest checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from scaleforge.core.callbacks import Callback
from scaleforge.core.checkpoint.checkpointer import Checkpointer
from scaleforge.core.checkpoint.paths import read_info
from scaleforge.core.checkpoint.snapshot_writer import SnapshotWriter
from scaleforge.core.checkpoint.snapshots import newest_reachable
from scaleforge.core.metrics import MetricsLogger
from scaleforge.parallel.collectives import broadcast_from_rank0

if TYPE_CHECKING:
    from scaleforge.core.config import Config
    from scaleforge.core.trainer import Trainer


class SnapshotCallback(Callback):
    """Takes the snapshots; after a resume from one, prints when training runs again."""

    def __init__(self, every: int, root: Path):
        self.every = every
        self.root = root
        self.writer: SnapshotWriter | None = None  # set by `attach`
        self.resumed_snapshot_time: float | None = None  # when the snapshot resumed was taken

    def attach(self, main: Checkpointer, cfg: Config, device: torch.device) -> None:
        """Build the snapshots' writer over what `main` saves (the newest KEEP kept, in
        `root`; pinned host memory on a CUDA `device`). Nothing without snapshots."""
        if not self.every:
            return
        self.writer = SnapshotWriter(main, self.root, device, cfg.parallel.timeout_s)

    def resume_point(self, checkpoint: Path | None, resume: str) -> Path | None:
        """With snapshots and trainer.resume=auto (`resume`): the newest snapshot every
        rank can reach (rank 0 reads the folders and puts back files from peer copies)
        when it is newer than `checkpoint`; else `checkpoint`. Collective; call after
        `attach`."""
        if self.writer is None or resume != "auto":
            return checkpoint
        topology = self.writer.checkpointer.topology
        found = newest_reachable(self.root, topology.world_size) if topology.is_rank0 else None
        chosen = broadcast_from_rank0(topology, str(found[1]) if found else "")
        if not chosen:
            return checkpoint
        snapshot = Path(chosen)
        info = read_info(snapshot)
        if checkpoint is not None and read_info(checkpoint)["step"] >= info["step"]:
            return checkpoint
        self.resumed_snapshot_time = time.mktime(
            time.strptime(info["saved_at"], "%Y-%m-%dT%H:%M:%S"))
        return snapshot

    def post_step(self, trainer: Trainer, logger: MetricsLogger) -> dict[str, bool]:
        if self.resumed_snapshot_time is not None:
            now = time.time()
            logger.message(
                f"recovery: training again at {now:.3f} (step {trainer.step} done), "
                f"{now - self.resumed_snapshot_time:.1f} s after the snapshot it resumed from "
                "was taken")
            self.resumed_snapshot_time = None
        if self.writer is None:
            return {}
        # The previous snapshot is on disk by the end of the step after it, so a failure
        # loses at most `every` completed steps (its write overlapped this step).
        self.writer.wait()
        step, cfg = trainer.step, trainer.cfg
        durable = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
        if (not self.every or step % self.every or step >= cfg.trainer.max_steps or durable
                or trainer.stop_requested):
            return {}
        self.writer.start(step)
        return {}
