"""Fast-recovery snapshots: a checkpoint every `checkpoint.snapshot_every` steps into
node-local storage (`checkpoint.snapshot_dir`, default a folder in /dev/shm, i.e. memory),
each rank's files also copied into its peer's folder (rank r's into rank (r + 1) mod world's),
so one lost node does not lose its shard.

    SNAPSHOT_DIR/checkpoints/step_<N>/          the snapshot, as a checkpoint (DCP files
                                                __<rank>_0.distcp, .metadata, complete.json)
    SNAPSHOT_DIR/peers/rank<P>/step_<N>/        the copies rank P holds for rank P - 1

A snapshot is a regular checkpoint, so it resumes exactly; it is staged in host memory and
written in the background (core/checkpoint/snapshot_writer.py). Each folder above is
written under a partial name (`.step_<N>.partial`) and renamed when complete, and only
`step_<N>` folders are read here, so a snapshot torn by a failure is never taken. On a
start with `trainer.resume=auto`, `newest_reachable` takes the newest snapshot whose every
file is in its folder or in a peer's copy, puts the missing files back from the copies,
and the run resumes from it when it is newer than the newest checkpoint in RUN_DIR. All
folders are read by rank 0: on one machine, or where the node-local folders are reachable
from it; across nodes without that each node would have to put its own files back, which
is not done here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from scaleforge.core.checkpoint.paths import COMPLETE, complete_checkpoints, partial_dir, step_dir
from scaleforge.core.config import Config

# Snapshots (and peer copies) kept: the newest two.
KEEP = 2
# Files of a snapshot written by rank 0 besides its own shard.
RANK0_FILES = (".metadata", COMPLETE, "config.yaml")


def snapshot_root(cfg: Config, run_dir: Path) -> Path:
    """`checkpoint.snapshot_dir`, or /dev/shm/scaleforge/<run dir name>-<hash of its path>
    (the system's temporary folder where /dev/shm is absent)."""
    if cfg.checkpoint.snapshot_dir:
        return Path(cfg.checkpoint.snapshot_dir)
    memory = Path("/dev/shm")
    base = memory if memory.is_dir() else Path(tempfile.gettempdir())
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
    return base / "scaleforge" / f"{run_dir.name}-{digest}"


def peer_dir(root: Path, holder: int) -> Path:
    """The folder of the copies rank `holder` keeps for its peer."""
    return root / "peers" / f"rank{holder}"


def own_files(snapshot: Path, rank: int) -> list[Path]:
    """The files of `snapshot` that rank `rank` wrote."""
    files = sorted(snapshot.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        files += [snapshot / name for name in RANK0_FILES if (snapshot / name).exists()]
    return files


def copy_to_peer(root: Path, source: Path, step: int, rank: int, world_size: int) -> None:
    """Copy this rank's files of snapshot `step` from `source` (its folder, complete or
    still partial) into its peer's folder, under a partial name renamed when complete, and
    keep the newest KEEP there (each rank writes into one peer folder only)."""
    holder = peer_dir(root, (rank + 1) % world_size)
    target = holder / f"step_{step}"
    partial = partial_dir(target)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in own_files(source, rank):
        shutil.copy2(path, partial / path.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    steps = sorted(int(p.name.removeprefix("step_")) for p in holder.glob("step_*"))
    for old in steps[:-KEEP]:
        shutil.rmtree(holder / f"step_{old}", ignore_errors=True)
    for leftover in holder.glob(".step_*.partial"):  # copies a killed run left unfinished
        shutil.rmtree(leftover, ignore_errors=True)


def newest_reachable(root: Path, world_size: int) -> tuple[int, Path] | None:
    """(step, folder) of the newest snapshot every rank's files of which are in its folder
    or a peer copy, with the missing ones copied back into its folder; None if none."""
    steps = {step for step, _ in complete_checkpoints(root)}
    steps |= {int(p.name.removeprefix("step_")) for p in root.glob("peers/rank*/step_*")}
    for step in sorted(steps, reverse=True):
        folder = step_dir(root, step)
        copies = sorted(root.glob(f"peers/rank*/step_{step}"))
        missing = [rank for rank in range(world_size)
                   if not _has_files(folder, rank) and not any(_has_files(c, rank) for c in copies)]
        if missing:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for rank in range(world_size):
            if not _has_files(folder, rank):
                source = next(c for c in copies if _has_files(c, rank))
                for path in own_files(source, rank):
                    shutil.copy2(path, folder / f".{path.name}.partial")
                    os.replace(folder / f".{path.name}.partial", folder / path.name)
        return step, folder
    return None


def _has_files(folder: Path, rank: int) -> bool:
    shard = any(folder.glob(f"__{rank}_*.distcp"))
    return shard and (rank != 0 or all((folder / name).exists() for name in RANK0_FILES))
