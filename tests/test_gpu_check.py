"""bench/gpu_check.sh's CPU side, as CI runs it: the dry check validates every configuration
the GPU run will time and imports its entry points, so the prepared command cannot fail on
a typo when GPU time is scarce; and the report's table reads the runs right."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from scaleforge.bench.gpu_check import SEQ_LEN, markdown_table, speed_runs

REPO = Path(__file__).resolve().parent.parent


def test_dry_check_validates_every_speed_run():
    done = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh"), "--dry"],
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    runs = speed_runs()
    for run in runs:
        if run.system == "scaleforge":
            assert any(line.startswith(f"dry: {run.name}: ") for line in lines), run.name
    assert f"dry: {len(runs)} speed runs checked" in lines
    assert any("torchtitan" in line for line in lines)


def test_speed_runs_cover_every_backend_compile_and_checkpointing_setting():
    runs = speed_runs()
    assert len({run.name for run in runs}) == len(runs)
    ours = [run for run in runs if run.system == "scaleforge" and run.model == "llama_1b"]
    assert {(r.attention, r.compile) for r in ours} == {
        (a, c) for a in ("sdpa", "flash", "flex") for c in (True, False)}
    assert {r.activation_checkpointing for r in ours} == {"none", "selective"}
    assert {r.compile for r in runs if r.system == "torchtitan"} == {True, False}


def test_markdown_table_gives_the_ratio_to_torchtitan_at_the_same_compile_setting():
    def record(run, tokens_per_s):
        return {"run": asdict(run), "name": run.name, "status": "ok",
                "tokens_per_s": tokens_per_s, "mfu": 0.4, "mfu_6n_attention": 0.5,
                "peak_memory_gib": 30.0}

    ours, titan = speed_runs()[0], speed_runs()[1]  # both compiled
    report = {"device": "NVIDIA H200", "torch": "2.11.0", "seq_len": SEQ_LEN,
              "warmup_steps": 3, "timed_steps": 8,
              "runs": [record(ours, 66_000.0), record(titan, 60_000.0),
                       {"run": asdict(speed_runs()[2]), "name": "x", "status": "failed: OOM"}]}
    table = markdown_table(report, {"steps": {"pytest -m cuda": "exit 0"}})
    assert "NVIDIA H200" in table and "- pytest -m cuda: exit 0" in table
    assert f"| {ours.name} | 4 x 2048 | 66,000 | 40.0% | 50.0% | 30.0 | 1.100 |" in table
    assert "| x | 4 x 2048 | failed: OOM | | | | |" in table
