"""Where checkpoints live, which one a run resumes from, and which ones are deleted.

RUN_DIR/checkpoints/step_<N>/ is complete once it holds complete.json; a save writes into
RUN_DIR/checkpoints/.step_<N>.partial/ first (core/checkpoint/atomic_write.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from scaleforge.errors import ConfigError
from scaleforge.parallel.collectives import broadcast_from_rank0
from scaleforge.parallel.topology import Topology

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: str | Path) -> Path:
    """RUN_DIR/checkpoints, the directory holding a run's checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir: str | Path, step: int) -> Path:
    """The directory of the checkpoint of `step` (complete or not, existing or not)."""
    return checkpoint_root(run_dir) / f"step_{step}"


def partial_dir(final: Path) -> Path:
    """Where the checkpoint that becomes `final` is written until it is complete."""
    return final.parent / f".{final.name}.partial"


def is_complete(path: Path) -> bool:
    """Whether `path` is a checkpoint whose save finished (it holds complete.json)."""
    return (path / COMPLETE).is_file()


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def find_checkpoint(path: str | Path, setting: str) -> Path:
    """A complete checkpoint directory from `path`: a step_<N> directory, a run's
    `checkpoints/` directory or a run directory (the newest complete checkpoint). Raises a
    ConfigError naming `setting` when there is none."""
    path = Path(path)
    if is_complete(path):
        return path
    newest = latest_checkpoint(path.parent if path.name == CHECKPOINTS else path)
    if newest is not None:
        return newest
    if path.is_dir() and _STEP_DIR.match(path.name):
        raise ConfigError(
            f"{setting}={path}: this checkpoint is incomplete (no {COMPLETE}; its save was "
            "interrupted); point at a complete one or at the run directory to take the newest"
        )
    raise ConfigError(
        f"{setting}={path}: no complete checkpoint there (expected a step_<N> directory with "
        f"{COMPLETE}, or a run directory with {CHECKPOINTS}/step_<N>/); check the path"
    )


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint `trainer.resume` asks for: never -> None; auto -> the newest complete
    one in `run_dir` (None in a fresh run); anything else is a path that must hold one."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    return find_checkpoint(resume, "trainer.resume")


def choose_resume(resume: str, run_dir: str | Path, topology: Topology) -> Path | None:
    """`resolve_resume` on every rank (so a bad path fails everywhere alike), then rank 0's
    choice on all: every rank loads the same checkpoint even if one completed meanwhile.
    Collective."""
    choice = resolve_resume(resume, run_dir)
    chosen = broadcast_from_rank0(topology, str(choice) if choice else "")
    return Path(chosen) if chosen else None


def read_info(path: Path) -> dict[str, Any]:
    """The contents of a checkpoint's complete.json (step, tokens, layout, time)."""
    return json.loads((path / COMPLETE).read_text())


def prune_checkpoints(run_dir: str | Path, keep: int, writing: Path | None = None) -> None:
    """Keep the newest `keep` complete checkpoints of a run (0 keeps all) and delete the
    partial directories of interrupted saves, except `writing` (a save still in flight)."""
    for path in checkpoint_root(run_dir).glob(".step_*.partial"):
        if path != writing:
            shutil.rmtree(path, ignore_errors=True)
    if keep > 0:
        for _, path in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
