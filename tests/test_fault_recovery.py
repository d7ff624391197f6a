"""Recovery as users meet it: sf-train stopped by SIGTERM and started again, and a torchrun
job whose worker is killed, restarted by torchrun from the newest complete checkpoint. In
both the per-step losses after the restart equal those of a run that was never stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from commands import free_port, one_thread_env, run_tool, start_tool
from scaleforge.core.checkpoint.paths import complete_checkpoints

RUN = [
    "model=llama_micro",
    "data.vocab_size=512",
    "data.seq_len=64",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_tokens=512",
    "trainer.precision=fp32",
    "trainer.device=cpu",
    "trainer.log_every=1",
    "trainer.eval_batches=2",
    "optim.warmup_steps=2",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
    "trainer.resume=auto",
]


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float) -> None:
    """Poll metrics.jsonl until a record of `step` or later is there."""
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in _records(run_dir)):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.02)


def _complete_checkpoints(run_dir: Path) -> list[int]:
    return [step for step, _ in complete_checkpoints(run_dir)]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_0_and_resume_matches_an_uninterrupted_run(
    tmp_path, stdlib_overrides
):
    steps = 30
    overrides = [
        *RUN,
        *stdlib_overrides,
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
    ]
    reference = tmp_path / "reference"
    done = run_tool("sf-train", *overrides, f"run_dir={reference}", cwd=tmp_path,
                    env=one_thread_env())
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "run"
    process = start_tool("sf-train", *overrides, f"run_dir={run_dir}", cwd=tmp_path,
                         env=one_thread_env())
    _wait_for_step(process, run_dir, 3, timeout=300)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    stopped = max(_losses(_records(run_dir)))
    assert 3 <= stopped < steps
    assert _complete_checkpoints(run_dir) == [stopped]
    assert (
        f"preempted by SIGTERM: stopped after step {stopped} and saved checkpoint "
        f"{run_dir / 'checkpoints' / f'step_{stopped}'}"
    ) in stdout
    assert not (run_dir / "scaling.json").exists()  # the run is not finished

    resumed = run_tool("sf-train", *overrides, f"run_dir={run_dir}", cwd=tmp_path,
                       env=one_thread_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped}'}" in resumed.stdout
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(steps + 1))  # each step logged once
    assert _losses(records) == _losses(_records(reference))  # bitwise, every step
    assert records[-1]["val_loss"] == _records(reference)[-1]["val_loss"]


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children + [d for child in children for d in _descendants(child)]


def _worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the torchrun worker whose environment has RANK=`rank`."""
    for pid in _descendants(torchrun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under torchrun {torchrun_pid}")


def _torchrun(run_dir: Path, overrides: list[str], cwd: Path,
              max_restarts: int = 1) -> subprocess.Popen:
    """Two sf-train workers under torchrun (restarted up to `max_restarts` times)."""
    return start_tool(
        "torchrun",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(max_restarts),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "-m",
        "scaleforge.launch.train",
        *overrides,
        f"run_dir={run_dir}",
        cwd=cwd,
        env=one_thread_env(),
    )


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_from_the_newest_checkpoint_with_equal_losses(
    tmp_path, stdlib_overrides
):
    steps = 16
    overrides = [
        *RUN,
        *stdlib_overrides,
        "parallel.dp_shard=2",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        "checkpoint.every=2",
        "checkpoint.keep=2",
        "parallel.timeout_s=60",
    ]
    reference = tmp_path / "reference"
    job = _torchrun(reference, overrides, tmp_path)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    expected = _losses(_records(reference))
    assert sorted(expected) == list(range(1, steps + 1))

    run_dir = tmp_path / "run"
    job = _torchrun(run_dir, overrides, tmp_path)
    _wait_for_step(job, run_dir, 5, timeout=300)  # step_4 is complete before step 5 runs
    # The first attempt's records, read before the kill: the restarted attempt drops those
    # after the step it resumes from (MetricsLogger.resume_at).
    first = _losses(_records(run_dir))
    os.kill(_worker_pid(job.pid, rank=1), signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    assert stdout.count("resumed from") == 1, stderr[-3000:]

    match = re.search(r"resumed from \S+/step_(\d+) at step (\d+)", stdout)
    assert match and match[1] == match[2], stdout[-3000:]
    resumed_at = int(match[1])
    assert resumed_at >= 4 and resumed_at % 2 == 0
    # metrics.jsonl holds the first attempt's records up to the checkpoint, then the
    # restarted attempt's, one per step.
    records = [r for r in _records(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    kept, second = _losses(records[:resumed_at]), _losses(records[resumed_at:])
    assert kept == {step: loss for step, loss in first.items() if step <= resumed_at}
    assert list(second) == list(range(resumed_at + 1, steps + 1))
    for step, loss in second.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=0), f"step {step}"
    for step, loss in first.items():  # the first attempt matched too, up to the kill
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=0), f"step {step}"


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_worker_after_one_step_with_a_checkpoint(
    tmp_path, stdlib_overrides
):
    run_dir = tmp_path / "run"
    overrides = [*RUN, *stdlib_overrides, "parallel.dp_shard=2", "trainer.max_steps=200",
                 "trainer.eval_every=200"]
    job = _torchrun(run_dir, overrides, tmp_path, max_restarts=0)
    _wait_for_step(job, run_dir, 3, timeout=300)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=120)
    # torchrun forwards SIGTERM to both workers, which save and exit 0; torchrun itself
    # then re-raises the signal as SignalException and exits with status 1.
    assert job.returncode == 1 and "SignalException" in stderr, stderr[-3000:]
    stopped = max(_losses(_records(run_dir)))
    assert stopped < 200 and _complete_checkpoints(run_dir) == [stopped]
    assert stdout.count(f"preempted by SIGTERM: stopped after step {stopped}") == 1


def test_slurm_template_passes_usr1_to_srun_and_requeues_after_the_save(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text(
        "#!/bin/bash\nif [ \"$1\" = show ]; then printf 'node-a\\n'; "
        f'else echo "$@" >> {tmp_path / "scontrol_args"}; fi\n'
    )
    # srun stands in for the job step: it reports the signal and exits as torchrun does.
    (stubs / "srun").write_text(
        f'#!/bin/bash\necho "$@" > {tmp_path / "srun_args"}\n'
        f"trap 'echo USR1 > {tmp_path / 'srun_signal'}; sleep 0.2; exit 1' USR1\n"
        "while true; do sleep 0.05; done\n"
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    template = Path(__file__).parents[1] / "launch" / "slurm_train.sbatch"
    env = {
        **os.environ,
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node-a",
        "SLURM_NNODES": "1",
        "REQUEUE": "1",
        "SCALEFORGE_PYTHON": sys.executable,  # the template's default, .venv/bin/python, is
        # relative to the job's directory (here tmp_path)
    }
    job = subprocess.Popen(
        ["bash", str(template)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun_args").exists():
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # let the template install its trap and reach its wait
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=30)
    assert job.returncode == 0, stderr
    assert (tmp_path / "srun_signal").read_text() == "USR1\n"
    assert "preempted: training saved a checkpoint in runs/slurm-42/checkpoints" in stdout
    assert (tmp_path / "scontrol_args").read_text() == "requeue 42\n"
    args = (tmp_path / "srun_args").read_text()
    assert "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in args
    assert "#SBATCH --signal=B:USR1@120" in template.read_text()
