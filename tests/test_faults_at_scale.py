"""Faults at cluster scale: fault drills through SCALEFORGE_INJECT_FAULT, the hang watchdog
(a rank stalled in a collective named within seconds, its stacks on disk), and straggler
detection (a rank slowed 1.5x named within 3 log intervals, none in an unslowed run), the
kill drill under torchrun, and snapshots (a killed rank back from the newest snapshot, or its
peer's copy, with the uninterrupted run's losses)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from commands import free_port, hang_drill, one_thread_env, start_tool
from distributed import run_distributed_test
from micro_runs import micro_config, synthetic_data
from run_metrics import metrics_records
from scaleforge.core.callbacks.hang_watchdog import (
    FLIGHT_RECORDER_ENV,
    HANG_EXIT_STATUS,
    hang_verdict,
    stalled_call,
)
from scaleforge.core.callbacks.step_timing import PARTS
from scaleforge.core.callbacks.straggler import STRAGGLER_INTERVALS
from scaleforge.core.config import hang_timeout_s, validate
from scaleforge.core.fault_injection import VARIABLE, Fault, injected_faults, parse_faults
from scaleforge.core.trainer import Trainer, start_topology
from scaleforge.errors import ConfigError


def test_inject_fault_names_each_kind_and_several_separated_by_commas():
    assert parse_faults("hang:rank=1:step=3, slow:rank=2:factor=1.5,kill:step=5:rank=0") == [
        Fault("hang", 1, 3), Fault("slow", 2, 1, 1.5), Fault("kill", 0, 5)]
    assert parse_faults("slow:rank=1:factor=2:step=4") == [Fault("slow", 1, 4, 2.0)]


def test_inject_fault_unset_or_empty_injects_nothing(monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    assert injected_faults() == []
    monkeypatch.setenv(VARIABLE, "")
    assert injected_faults() == []


@pytest.mark.parametrize("value, named", [
    ("hang:rank=1", "lacks step"),
    ("freeze:rank=1:step=3", "unknown kind 'freeze'"),
    ("hang:rank=1:step=three", "not a number"),
    ("slow:rank=1:factor=0.5", "factor > 1"),
    ("kill:rank=1:step=0", "step >= 1"),
    ("hang:rank=1:step=3;kill:rank=0:step=2", "separate faults with ','"),
    ("kill:rank=1:step=5:factor=2", "has 'factor=2'"),
])
def test_a_malformed_inject_fault_fails_validation_naming_the_variable(
        tmp_path, monkeypatch, value, named):
    monkeypatch.setenv(VARIABLE, value)
    with pytest.raises(ConfigError) as info:
        validate(micro_config(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{VARIABLE}={value!r}") and named in message, message
    assert "\n" not in message


@pytest.mark.parametrize("overrides, named", [
    (["parallel.timeout_s=60", "trainer.hang_timeout_s=60"], "trainer.hang_timeout_s=30"),
    (["trainer.hang_timeout_s=-1"], "trainer.hang_timeout_s=-1"),
    (["trainer.straggler_ratio=1"], "trainer.straggler_ratio=1"),
    (["trainer.on_straggler=kill"], "trainer.on_straggler"),
])
def test_bad_watchdog_and_straggler_settings_fail_naming_the_setting(tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        validate(micro_config(tmp_path, *overrides))


def test_hang_timeout_defaults_to_half_the_collective_timeout_at_most_300_s(tmp_path):
    assert hang_timeout_s(micro_config(tmp_path)) == 300  # parallel.timeout_s=600
    assert hang_timeout_s(micro_config(tmp_path, "parallel.timeout_s=60")) == 30
    assert hang_timeout_s(micro_config(tmp_path, "trainer.hang_timeout_s=0")) == 0


def test_the_watchdog_turns_the_flight_recorder_on_before_the_process_group_starts(
        tmp_path, monkeypatch):
    for name in FLIGHT_RECORDER_ENV:
        monkeypatch.setenv(name, "")  # so that monkeypatch restores it after the test
        monkeypatch.delenv(name)
    start_topology(micro_config(tmp_path, "trainer.hang_timeout_s=0"), 1)
    assert not set(FLIGHT_RECORDER_ENV) & set(os.environ)
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "64")  # a user's own setting is kept
    start_topology(micro_config(tmp_path), 1)
    assert os.environ["TORCH_FR_BUFFER_SIZE"] == "64"
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"


def test_hang_verdict_names_the_rank_behind_the_others_and_its_call():
    def dump(rank, step, joined, where):
        return {"rank": rank, "last_step": step, "collectives_joined": joined,
                "stalled_at": where}

    waiting = "parallel/collectives.py:90 in sum_over_world"
    dumps = {0: dump(0, 2, 12, waiting), 1: dump(1, 2, 11, "core/health.py:70 in f"),
             3: dump(3, 2, 12, waiting)}
    line = hang_verdict(dumps, 4, 10)
    assert line.startswith("hang: rank 1 stopped progressing first (last completed step 2, "
                           "11 collectives joined) - stalled: rank 1 at core/health.py:70 in f")
    assert "ranks 0, 3 went further" in line and "no dump from ranks 2" in line
    assert "\n" not in line
    even = hang_verdict({0: dump(0, 5, 3, waiting), 1: dump(1, 5, 3, waiting)}, 2, 10)
    assert "ranks 0, 1 stopped progressing first" in even
    assert "no rank got further than another" in even


def test_stalled_call_is_the_innermost_call_of_the_package():
    import traceback

    def inner():
        return traceback.extract_stack()

    where = stalled_call(inner())
    assert where.startswith("tests/test_faults_at_scale.py:") and " in inner <- " in where


# --- Stragglers: 4 gloo processes -----------------------------------------------------------

def _train_with_fault(cfg, run_dir: Path, fault: str) -> dict:
    os.environ[VARIABLE] = fault
    topology = start_topology(cfg)
    data = synthetic_data(cfg, dp_rank=topology.dp_rank, dp_size=topology.dp_size)
    trainer = Trainer(cfg, run_dir, topology.world_size, data=data, topology=topology)
    trainer.fit()
    return {"step": trainer.step, "preempted": trainer.preempted}


def _straggler_run(tmp_path: Path, name: str, fault: str) -> tuple[list[dict], list[dict]]:
    cfg = micro_config(tmp_path, "trainer.max_steps=15", "trainer.log_every=3",
                       "trainer.eval_every=0", "trainer.micro_batch_size=1",
                       "trainer.global_batch_tokens=1024", "trainer.on_straggler=stop",
                       "checkpoint.at_end=false", "trainer.save_final_weights=false")
    run_dir = tmp_path / name
    results = run_distributed_test(_train_with_fault, world_size=4,
                                   func_args=(cfg, run_dir, fault))
    return results, metrics_records(run_dir)


@pytest.mark.slow
def test_a_rank_slowed_1_5x_is_named_within_3_log_intervals_and_stop_saves_and_exits(tmp_path):
    results, records = _straggler_run(tmp_path, "slowed", "slow:rank=1:factor=1.5")
    named = [r for r in records if "straggler_ranks" in r]
    assert named, records
    # named at the 3rd interval of slowness (step 9), or later only if load hid one
    assert named[0]["step"] <= 3 * (STRAGGLER_INTERVALS + 1), records
    assert all(r["straggler_ranks"] == [1] for r in named), named
    first = named[0]
    others = [first[f"compute_s/rank{rank}"] for rank in (0, 2, 3)]
    assert first["compute_s/rank1"] > 1.2 * sorted(others)[1], first
    # trainer.on_straggler=stop: every rank saved and stopped after that step
    assert results == [{"step": first["step"], "preempted": True}] * 4
    assert (tmp_path / "slowed" / "checkpoints" / f"step_{first['step']}").is_dir()


@pytest.mark.slow
def test_no_rank_is_named_a_straggler_in_an_unslowed_run_of_the_same_length(tmp_path):
    results, records = _straggler_run(tmp_path, "even", "")
    assert results == [{"step": 15, "preempted": False}] * 4
    assert not [r for r in records if "straggler_ranks" in r], records
    logged = [r for r in records if r["step"] % 3 == 0 and r["step"] > 0]
    assert len(logged) == 5
    # every rank's step parts (core/callbacks/step_timing.py) in every interval's record
    assert all(f"{part}/rank{rank}" in r for r in logged for rank in range(4) for part in PARTS)


# --- The hang watchdog: 4 sf-train workers under torchrun ----------------------------------

RUN = [
    "model=llama_micro", "data.vocab_size=512", "data.seq_len=64",
    "trainer.micro_batch_size=2", "trainer.global_batch_tokens=512",
    "trainer.precision=fp32", "trainer.device=cpu", "trainer.log_every=1",
    "trainer.eval_batches=2", "optim.warmup_steps=2", "logging.wandb=disabled",
    "logging.progress_bar=false", "trainer.max_steps=50", "trainer.eval_every=50",
]
HANG_TIMEOUT_S = 10


@pytest.mark.slow
def test_a_rank_hung_in_a_collective_ends_the_run_naming_it_with_stacks_on_disk(
        tmp_path, stdlib_overrides):
    run_dir = tmp_path / "run"
    stderr, ended, verdict = hang_drill(tmp_path, 4, *RUN, *stdlib_overrides,
                                        f"run_dir={run_dir}", fault="hang:rank=1:step=3",
                                        hang_timeout_s=HANG_TIMEOUT_S)
    fired = re.search(r"^(\d+\.\d+) SCALEFORGE_INJECT_FAULT fires: hang:step=3", stderr, re.M)
    assert fired, stderr[-3000:]
    assert ended - float(fired[1]) < HANG_TIMEOUT_S + 30, stderr[-3000:]
    print(verdict)
    assert verdict.startswith("hang: rank 1 stopped progressing first (last completed step 2"), \
        verdict
    assert "rank 1 at parallel/collectives.py:" in verdict, verdict
    assert "in sum_over_world <- core/health.py:" in verdict, verdict
    assert "ranks 0, 2, 3 went further" in verdict, verdict
    assert (run_dir / "hang" / "verdict.txt").read_text() == verdict + "\n"
    headers = {}
    for rank in range(4):
        dump = (run_dir / "hang" / f"rank{rank}.txt").read_text()
        headers[rank] = json.loads(dump.splitlines()[0])
        assert headers[rank]["rank"] == rank and headers[rank]["last_step"] == 2
        assert "every thread (faulthandler):" in dump and "agree_on_step" in dump
        # the flight recorder's record of the rank's collectives (gloo's on the CPU wheels)
        assert (run_dir / "hang" / f"rank{rank}.flight_recorder").stat().st_size > 0
    # rank 1 sleeps before joining the step's all-reduce, in which the others wait for it
    assert headers[1]["in_collective"] is None
    for rank in (0, 2, 3):
        assert headers[rank]["in_collective"] == "sum_over_world"
        assert headers[rank]["collectives_joined"] == headers[1]["collectives_joined"] + 1
    assert f"exitcode  : {HANG_EXIT_STATUS}" in stderr


# --- The kill drill: torchrun restarts the job, which meets no second kill -----------------

@pytest.mark.slow
def test_a_rank_killed_by_the_drill_is_restarted_by_torchrun_and_the_run_finishes(
        tmp_path, stdlib_overrides):
    run_dir = tmp_path / "run"
    steps = 8
    job = start_tool(
        "torchrun", "--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "scaleforge.launch.train",
        *RUN, *stdlib_overrides, "parallel.dp_shard=2", f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}", "checkpoint.every=2", "parallel.timeout_s=60",
        f"run_dir={run_dir}", cwd=tmp_path,
        env={**one_thread_env(), VARIABLE: "kill:rank=1:step=5"},
    )
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    # fired once, in the first attempt; the second resumed from step 4's checkpoint
    assert stderr.count("SCALEFORGE_INJECT_FAULT fires: kill:rank=1:step=5") == 1, stderr[-3000:]
    assert re.search(r"resumed from \S+/step_4 at step 4", stdout), stdout[-3000:]
    losses = [r["step"] for r in metrics_records(run_dir) if "loss" in r]
    assert losses == list(range(1, steps + 1))


# --- Snapshots: a killed rank back in training from the newest snapshot --------------------

def _snapshot_job(run_dir: Path, snapshots: Path, cwd: Path, stdlib_overrides: list[str],
                  fault: str, max_restarts: int):
    steps = 10
    overrides = [o for o in RUN if not o.startswith(("trainer.max_steps", "trainer.eval_every"))]
    env = one_thread_env()
    env.pop(VARIABLE, None)
    if fault:
        env[VARIABLE] = fault
    return start_tool(
        "torchrun", "--nproc-per-node", "4", "--max-restarts", str(max_restarts),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "-m", "scaleforge.launch.train", *overrides, *stdlib_overrides,
        f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
        "checkpoint.snapshot_every=2", f"checkpoint.snapshot_dir={snapshots}",
        "parallel.timeout_s=60", f"run_dir={run_dir}", cwd=cwd, env=env,
    )


def _losses_of(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_records(run_dir) if "loss" in r}


@pytest.mark.slow
def test_a_killed_rank_resumes_from_the_newest_snapshot_losing_at_most_2_steps_bitwise(
        tmp_path, stdlib_overrides):
    reference = _snapshot_job(tmp_path / "reference", tmp_path / "snap_ref", tmp_path,
                              stdlib_overrides, "", 0)
    _, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stderr[-3000:]
    expected = _losses_of(tmp_path / "reference")
    assert sorted(expected) == list(range(1, 11))

    # kill -9 of rank 1 as step 5 starts, while step 4's snapshot may still be written in
    # the background; torchrun restarts from step_4, or from step_2 if step 4's was not
    # renamed yet (never from a torn one): at most 2 completed steps lost
    job = _snapshot_job(tmp_path / "killed", tmp_path / "snap_killed", tmp_path,
                        stdlib_overrides, "kill:rank=1:step=5", 1)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    fired = re.search(r"^(\d+\.\d+) SCALEFORGE_INJECT_FAULT fires: kill", stderr, re.M)
    resumed = re.search(r"resumed from \S+snap_killed/checkpoints/step_(\d) at step (\d)", stdout)
    assert fired and resumed and resumed[1] == resumed[2] in ("2", "4"), stdout[-3000:]
    again = re.search(rf"recovery: training again at (\d+\.\d+) \(step {int(resumed[1]) + 1} "
                      r"done\)", stdout)
    assert again, stdout[-3000:]
    print(f"resumed from step {resumed[1]}; kill to the next step done: "
          f"{float(again[1]) - float(fired[1]):.1f} s")
    assert _losses_of(tmp_path / "killed") == expected  # bitwise: the floats as logged

    # the same with the killed rank's node-local file of the newest snapshot deleted (a kill
    # as step 8 starts: step 6's snapshot was on disk by the end of step 7)
    run_dir, snapshots = tmp_path / "lost", tmp_path / "snap_lost"
    job = _snapshot_job(run_dir, snapshots, tmp_path, stdlib_overrides, "kill:rank=1:step=8", 0)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode != 0
    shard = snapshots / "checkpoints" / "step_6" / "__1_0.distcp"
    assert (snapshots / "peers" / "rank2" / "step_6" / "__1_0.distcp").is_file()
    shard.unlink()
    job = _snapshot_job(run_dir, snapshots, tmp_path, stdlib_overrides, "", 0)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    assert re.search(r"resumed from \S+snap_lost/checkpoints/step_6 at step 6", stdout), \
        stdout[-3000:]
    assert shard.is_file()  # put back from rank 2's copy
    assert _losses_of(run_dir) == expected
