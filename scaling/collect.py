"""Gather the finished runs of a sweep directory into one table.

A run is finished when its directory holds `scaling.json` (written by sf-train when
training ends). Runs that started but did not finish, runs of the plan that never started
and runs whose loss is NaN are left out with a warning that names each of them.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from scaleforge.core.metrics import from_json
from scaleforge.errors import ConfigError
from scaleforge.scaling.run_record import RECORD_FILE
from scaleforge.scaling.sweep_files import read_plan


class SweepWarning(UserWarning):
    """A run of a sweep is left out of a table or a fit; the message names it and why."""


def _run_dirs(sweep_dir: Path) -> list[Path]:
    """Directories of `sweep_dir` (or of its `runs/`) that look like run directories."""
    root = sweep_dir / "runs" if (sweep_dir / "runs").is_dir() else sweep_dir
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and ((p / "metrics.jsonl").exists() or (p / RECORD_FILE).exists()
                                     or (p / "config.yaml").exists()))


def collect(sweep_dir: Path) -> list[dict]:
    """One row per finished run of `sweep_dir`: its scaling.json plus `budget` (the planned
    FLOP budget) when the sweep was planned by sf-sweep. Raises ConfigError when no run has
    finished."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep_dir={sweep_dir} does not exist")
    plan = read_plan(sweep_dir)
    planned = {run["name"]: run for run in plan["runs"]} if plan else {}
    rows, unfinished, failed = [], [], []
    seen = set()
    for run_dir in _run_dirs(sweep_dir):
        seen.add(run_dir.name)
        record_path = run_dir / RECORD_FILE
        if not record_path.is_file():
            unfinished.append(run_dir.name)
            continue
        record = from_json(record_path.read_text())
        if not math.isfinite(record["loss"]):
            failed.append(run_dir.name)
            continue
        if run_dir.name in planned:
            record["budget"] = planned[run_dir.name]["budget"]
        rows.append(record)
    never_started = sorted(set(planned) - seen)
    if unfinished:
        warnings.warn(f"skipping unfinished runs (no {RECORD_FILE}): {', '.join(unfinished)}",
                      SweepWarning, stacklevel=2)
    if never_started:
        warnings.warn(f"skipping planned runs that never started: {', '.join(never_started)}",
                      SweepWarning, stacklevel=2)
    if failed:
        warnings.warn(f"skipping runs whose final loss is NaN or infinite (diverged): "
                      f"{', '.join(failed)}", SweepWarning, stacklevel=2)
    if not rows:
        raise ConfigError(
            f"sweep_dir={sweep_dir} has no finished runs (none holds {RECORD_FILE}); wait for "
            "the sweep to finish or point sweep_dir at the directory `sf-sweep plan` wrote"
        )
    return rows
