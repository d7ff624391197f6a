"""The checkpoint settings (`checkpoint.*`): cadence, retention, async saves and snapshots,
each checked here; core/checkpoint/checkpointer.py and snapshots.py act on them."""

from __future__ import annotations

from dataclasses import dataclass

from scaleforge.errors import ConfigError


@dataclass
class CheckpointConfig:
    """Sharded checkpoints in RUN_DIR/checkpoints/step_<N>/ (see core/checkpoint/)."""

    # Save every N optimizer steps (0: only at the end).
    every: int = 0
    # Keep the newest K complete checkpoints (0 keeps all).
    keep: int = 3
    # Save when training ends (also after every=N saves).
    at_end: bool = True
    # Write in a background thread while training continues (the state is copied first).
    async_save: bool = False
    # Fast-recovery snapshots every N steps (0: off) into node-local snapshot_dir, each
    # rank's files also copied to its peer's folder; a restart with trainer.resume=auto
    # resumes from the newest snapshot every rank can reach when it is newer than the newest
    # checkpoint (core/checkpoint/snapshots.py).
    snapshot_every: int = 0
    # Where snapshots go (null: /dev/shm/scaleforge/<run dir name>-<hash of its path>).
    snapshot_dir: str | None = None

    def check(self, prefix: str = "checkpoint") -> None:
        """Raise ConfigError unless `every` and `keep` are >= 0."""
        if self.snapshot_every < 0:
            raise ConfigError(f"{prefix}.snapshot_every={self.snapshot_every} must be >= 0 "
                              "(0: no snapshots)")
        if self.every < 0 or self.keep < 0:
            raise ConfigError(
                f"{prefix}.every={self.every} and {prefix}.keep={self.keep} must be >= 0 "
                "(0 = only at the end / keep all)"
            )
