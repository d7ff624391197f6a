"""Fast-recovery snapshots every `checkpoint.snapshot_every` steps (core/checkpoint/
snapshots.py): a synchronous checkpoint into node-local storage, then each rank's files
copied to its peer's folder. Not at a step that saves a checkpoint anyway. On a start with
`trainer.resume=auto` the newest snapshot every rank can reach is resumed when it is newer
than the newest checkpoint."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING

from scaleforge.core.callbacks import Callback
from scaleforge.core.checkpoint.checkpointer import Checkpointer
from scaleforge.core.checkpoint.paths import read_info
from scaleforge.core.checkpoint.snapshots import KEEP, copy_to_peer, newest_reachable
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
        self.checkpointer: Checkpointer | None = None  # set by `attach`
        self.resumed_snapshot_time: float | None = None  # when the snapshot resumed was taken

    def attach(self, main: Checkpointer, cfg: Config) -> None:
        """Build the snapshots' checkpointer over what `main` saves: synchronous, the
        newest KEEP kept, in `root`. Nothing without snapshots."""
        if not self.every:
            return
        cfg = copy.deepcopy(cfg)
        cfg.checkpoint.keep, cfg.checkpoint.async_save = KEEP, False
        self.checkpointer = Checkpointer(cfg, self.root, main.topology, model=main.model,
                                         optimizer=main.optimizer, loader=main.loader,
                                         rng=main.rng, parts=main.parts)

    def resume_point(self, checkpoint: Path | None, resume: str) -> Path | None:
        """With snapshots and trainer.resume=auto (`resume`): the newest snapshot every
        rank can reach (rank 0 reads the folders and puts back files from peer copies)
        when it is newer than `checkpoint`; else `checkpoint`. Collective; call after
        `attach`."""
        if self.checkpointer is None or resume != "auto":
            return checkpoint
        topology = self.checkpointer.topology
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
