"""`sf-sweep check plan=<preset>` end to end on the tiny test preset (configs/sweep_plan/
check_tiny.yaml): sweep with 2 seeds per point, fit, predict the larger run with an interval,
train it, and write check.json with the prediction, the measurement, the error and the noise."""

from __future__ import annotations

import json
import math
import os

import pytest
from omegaconf import OmegaConf

from commands import run_tool

PRESET = OmegaConf.load(
    os.path.join(os.path.dirname(__file__), "..", "configs", "sweep_plan", "check_tiny.yaml"))


@pytest.mark.slow
def test_check_sweeps_fits_predicts_trains_and_writes_check_json(tmp_path, data_cache):
    # One thread per run: these models are tiny, and threads on a loaded machine made a run
    # 80x slower (433 vs 37,611 tokens/s measured).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = ",".join([*PRESET.overrides, f"data.cache_dir={data_cache}"])
    out = tmp_path / "check"
    result = run_tool("sf-sweep", "check", "plan=check_tiny", f"overrides=[{overrides}]",
                      f"out={out}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    fit = json.loads((out / "fit" / "fit.json").read_text())
    assert fit["n_runs"] == 12 and len(fit["budgets"]) == 2
    assert fit["noise"]["points"] == 6 and fit["noise"]["rel_std"] > 0
    check = json.loads((out / "check" / "check.json").read_text())
    low, high = check["interval"]
    assert low <= check["predicted"] <= high
    assert math.isfinite(check["measured"]) and check["measured"] > 0
    assert check["error"] == pytest.approx(check["predicted"] / check["measured"] - 1)
    assert check["noise"] == fit["noise"]["rel_std"]
    assert check["below_noise"] == (abs(check["error"]) <= 2 * check["noise"])
    assert check["inside"] == (low <= check["measured"] <= high)
    assert check["plan"]["budgets"] == [3e10, 6e10] and check["plan"]["seeds_per_point"] == 2
    assert check["budget"] == 2 * 6e10 and check["run"]["C"] <= check["budget"]
    assert "check at 1.2e+11 FLOPs: val_loss measured" in result.stdout
    assert "seed-to-seed noise" in result.stdout

