"""What a finished run logged: the records of its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def metrics_records(run_dir) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def logged_losses(run_dir) -> dict[int, float]:
    """step -> training loss of every logged step of a run."""
    return {r["step"]: r["loss"] for r in metrics_records(run_dir) if "loss" in r}
