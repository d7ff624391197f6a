"""bench/gpu_check.sh's CPU side: the dry check validates every configuration the GPU runs
will time and imports their entry points; the plans follow the card's memory and put the
headline pair (ours and torchtitan, SDPA, compiled) first; the report is written after every
step and its table reads the runs right. The whole script runs on the CPU in CI as
`bench/gpu_check.sh --rehearse` (.ci/gpu_rehearse.sh)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from scaleforge.bench.gpu_check import plan_for, speed_runs
from scaleforge.bench.gpu_report import markdown_table, record_step, write_report

REPO = Path(__file__).resolve().parent.parent


def test_dry_check_validates_every_speed_run():
    done = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh"), "--dry"],
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    plans = [plan_for(80.0), plan_for(141.0), plan_for(None)]
    for plan in plans:
        for run in speed_runs(plan):
            if run.system == "scaleforge":
                assert any(line.startswith(f"dry: {run.name}: ") for line in lines), run.name
    assert f"dry: {sum(len(speed_runs(p)) for p in plans)} speed runs checked" in lines
    assert any("torchtitan" in line for line in lines)


def test_plans_follow_the_cards_memory_and_put_the_headline_pair_first():
    h100, h200, cpu = plan_for(79.2), plan_for(139.8), plan_for(None)
    assert (h100.device, h100.model, h100.micro_batch_size, h100.big_model) == (
        "cuda", "llama_1b", 4, "")  # no 7B row on 80 GB: its AdamW state alone takes 108
    assert (h200.micro_batch_size, h200.big_model) == (8, "llama_7b")
    assert cpu.device == "cpu" and cpu.rehearsal and cpu.repeats == 3
    for plan in (h100, h200, cpu):
        runs = speed_runs(plan)
        assert [(r.system, r.attention, r.compile) for r in runs[:2]] == [
            ("scaleforge", "sdpa", True), ("torchtitan", "sdpa", True)]
        assert len({run.name for run in runs}) == len(runs)
        # then the fp8 pair: ours with trainer.fp8=tensorwise, torchtitan's float8 converter
        # (compiled on a GPU; eager in the rehearsal: compiled fp8 is refused on a CPU)
        on_gpu = plan.device == "cuda"
        assert [(r.system, r.attention, r.compile, r.fp8) for r in runs[2:4]] == [
            ("scaleforge", "sdpa", on_gpu, "tensorwise"), ("torchtitan", "sdpa", on_gpu,
                                                            "tensorwise")]
        assert "trainer.fp8=tensorwise" in runs[2].overrides
    assert len(speed_runs(cpu)) == 4  # flex has no CPU backward: SDPA on both sides only
    gpu = speed_runs(h200)
    assert {r.attention for r in gpu if r.system == "torchtitan"} == {"sdpa", "flex"}
    assert {r.attention for r in gpu if r.system == "scaleforge"} == {"sdpa", "flash", "flex"}
    assert {r.compile for r in gpu if r.system == "torchtitan"} == {True, False}
    assert gpu[-1].model == "llama_7b" and all(r.model != "llama_7b" for r in speed_runs(h100))


def _record(run, tokens_per_s):
    return {"run": asdict(run), "name": run.name, "status": "ok", "tokens_per_s": tokens_per_s,
            "spread": 0.02, "mfu": 0.4, "mfu_6n_attention": 0.5, "peak_memory_gib": 30.0}


def test_markdown_table_gives_the_ratio_to_torchtitan_at_equal_kernels():
    plan = plan_for(141.0)
    runs = {run.name: run for run in speed_runs(plan)}
    ours_sdpa, titan_sdpa, ours_fp8, titan_fp8, ours_flash, titan_flex = (
        speed_runs(plan)[i] for i in range(6))
    assert (ours_flash.attention, titan_flex.attention) == ("flash", "flex")
    speed = {"device": "NVIDIA H200", "torch": "2.11.0", "plan": asdict(plan),
             "runs": [_record(ours_sdpa, 66_000.0), _record(titan_sdpa, 60_000.0),
                      _record(ours_fp8, 90_000.0), _record(titan_fp8, 80_000.0),
                      _record(ours_flash, 72_000.0), _record(titan_flex, 64_000.0),
                      {"run": asdict(speed_runs(plan)[6]), "name": "x",
                       "status": "failed: OOM"}]}
    table = markdown_table({"steps": {"pytest -m cuda": "exit 0"}, "device": "NVIDIA H200",
                            "torch": "2.11.0", "speed": speed})
    assert "NVIDIA H200" in table and "- pytest -m cuda: exit 0" in table
    assert f"| {ours_sdpa.name} | 8 x 2048 | 66,000 | 2.0% | 40.0% | 50.0% | 30.0 | 1.100 |" \
        in table
    # flash has no torchtitan twin: against torchtitan's best at the same compile setting
    assert f"| {ours_flash.name} | 8 x 2048 | 72,000 | 2.0% | 40.0% | 50.0% | 30.0 | " \
           "1.125 (vs its best) |" in table
    # the fp8 row against torchtitan's fp8 row, not its bf16 ones
    assert f"| {ours_fp8.name} | 8 x 2048 | 90,000 | 2.0% | 40.0% | 50.0% | 30.0 | 1.125 |" \
        in table
    assert "| x | 8 x 2048 | failed: OOM | | | | | |" in table
    # without its twin (the CPU rehearsal skips torchtitan's fp8 row) an fp8 row gets no ratio
    speed["runs"] = [_record(ours_sdpa, 66_000.0), _record(titan_sdpa, 60_000.0),
                     _record(ours_fp8, 90_000.0)]
    table = markdown_table({"device": "cpu", "torch": "2.13.0", "speed": speed})
    assert f"| {ours_fp8.name} | 8 x 2048 | 90,000 | 2.0% | 40.0% | 50.0% | 30.0 |  |" in table
    assert len(runs) == len(speed_runs(plan))


def test_each_step_is_written_as_it_ends(tmp_path):
    """gpu_check.sh records each step into gpu_check.json as it ends, beside the speed
    report, so a run cut short keeps what it measured."""
    record_step(tmp_path, "install", "torch 2.11.0 on NVIDIA H100 80GB HBM3")
    plan = plan_for(80.0)
    write_report({"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "plan": asdict(plan),
                  "runs": [_record(speed_runs(plan)[0], 50_000.0)]}, tmp_path)
    record_step(tmp_path, "collectives", "exit 0")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "NVIDIA H100 80GB HBM3" and report["rehearsal"] is False
    assert list(report["steps"]) == ["install", "collectives"]
    assert report["speed"]["runs"][0]["tokens_per_s"] == 50_000.0
    assert "- collectives: exit 0" in (tmp_path / "gpu_check.md").read_text()
