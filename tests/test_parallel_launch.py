"""sf-train under torchrun, as users launch it: one node with two processes, two "nodes" that
meet through a c10d rendezvous on 127.0.0.1, and a bad layout that must stop every rank."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commands import free_port, one_thread_env, run_tool, start_tool
from run_metrics import metrics_records

TRAIN = ["-m", "scaleforge.launch.train"]
SMALL_RUN = [
    "model=llama_micro", "data.vocab_size=512", "data.seq_len=64", "trainer.micro_batch_size=2",
    "trainer.global_batch_tokens=512", "trainer.precision=fp32", "trainer.device=cpu",
    "trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=3",
    "trainer.eval_batches=2", "optim.warmup_steps=1", "logging.wandb=disabled",
    "logging.progress_bar=false",
]


def _torchrun(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_tool("torchrun", *args, cwd=cwd, timeout=timeout, env=one_thread_env())


def _check_run(run_dir: Path, steps: int) -> None:
    records = metrics_records(run_dir)
    assert [r["step"] for r in records] == list(range(steps + 1))  # written once, by rank 0
    state = torch.load(run_dir / "final_model.pt", weights_only=True)
    assert state["layers.0.attention.wq.weight"].shape == (64, 64)  # gathered, not a shard
    assert state["output.weight"].shape == (512, 64)


def test_torchrun_tp2_trains_end_to_end(tmp_path, stdlib_overrides):
    run_dir = tmp_path / "run"
    result = _torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), *TRAIN,
                       *SMALL_RUN, *stdlib_overrides, "parallel.tp=2", f"run_dir={run_dir}",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1
    assert "layout pp 1 x dp_replicate 1 x dp_shard 1 x cp 1 x tp 2" in result.stdout
    _check_run(run_dir, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no stray Hydra directories


def test_torchrun_pp2_trains_end_to_end_and_gathers_every_stage(tmp_path, stdlib_overrides):
    run_dir = tmp_path / "run"
    # 4 micro-batches per step; evaluation needs whole groups of them.
    result = _torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), *TRAIN,
                       *SMALL_RUN, *stdlib_overrides, "parallel.pp=2", "trainer.eval_batches=4",
                       f"run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layout pp 2 x dp_replicate 1 x dp_shard 1 x cp 1 x tp 1" in result.stdout
    assert "pipeline 1F1B, stages [0] on this rank, theoretical bubble 20.0%" in result.stdout
    _check_run(run_dir, 3)  # layer 0 from pp rank 0, the head from pp rank 1


def test_torchrun_without_parallel_settings_shards_data_parallel_over_every_process(
        tmp_path, stdlib_overrides):
    """parallel.dp_shard defaults to -1: FSDP over the whole world, as torchtitan does."""
    run_dir = tmp_path / "run"
    result = _torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), *TRAIN,
                       *SMALL_RUN, *stdlib_overrides, f"run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layout pp 1 x dp_replicate 1 x dp_shard 2 x cp 1 x tp 1" in result.stdout
    _check_run(run_dir, 3)


def test_two_nodes_meet_through_c10d_rendezvous_and_train_together(tmp_path, stdlib_overrides):
    run_dir, port = tmp_path / "run", free_port()
    nodes = [
        start_tool(
            "torchrun", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
            "two-node-test", *TRAIN, *SMALL_RUN, *stdlib_overrides, "parallel.dp_shard=2",
            f"run_dir={run_dir}", cwd=tmp_path, env=one_thread_env(),
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    assert sum(stdout.count("run directory:") for stdout, _ in outputs) == 1
    _check_run(run_dir, 3)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["parallel.tp=3"], "parallel.tp"),
        (["parallel.tp=2", "parallel.pp_schedule=ZigZag"], "parallel.pp_schedule"),
        (["model=llama_7"], "did you mean llama_7b?"),
    ],
)
def test_bad_layout_under_torchrun_stops_every_rank_with_one_error_line(tmp_path, overrides,
                                                                        named):
    result = _torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), *TRAIN,
                       *SMALL_RUN, *overrides, f"run_dir={tmp_path / 'run'}", cwd=tmp_path,
                       timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and named in errors[0], result.stderr[-3000:]
    assert "ConfigError" not in result.stderr  # no Python traceback from our ranks
    # torchrun's summary lists every rank as failed with the ConfigError's status 2 (none
    # with SIGTERM's -15: each rank waits for the others before it exits).
    for rank in (0, 1):
        assert f"rank      : {rank} (local_rank: {rank})" in result.stderr
    assert result.stderr.count("exitcode  : 2") == 2, result.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sf_torchrun_ends_a_bad_layout_with_one_line_and_status_2(tmp_path):
    """torchrun's ~40 lines after the ranks' own error line come from its launcher
    process; sf-torchrun runs the same launcher and leaves them out for status 2."""
    result = subprocess.run(
        [sys.executable, "-m", "scaleforge.launch.torchrun", "--nproc-per-node", "2",
         "--master-port", str(free_port()), *TRAIN, *SMALL_RUN, "parallel.tp=3",
         f"run_dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=one_thread_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "parallel.tp=3" in lines[0], \
        result.stderr[-3000:]


def test_sf_torchrun_holds_closing_signal_lines_until_the_failure_line_decides(caplog):
    """A rank that stopped with its own line a moment before the others makes torchrun log
    a closing-signal line for each of them, then the failure line: both are dropped for
    status 2; for a crash (status 1) the held lines come out, in order, before it."""
    from scaleforge.launch.torchrun import _FAILURE_LOGGER, _QuietOwnStop

    logger = logging.getLogger(_FAILURE_LOGGER)

    def torchrun_closes_after(status: int) -> list[str]:
        caplog.clear()
        quiet = _QuietOwnStop()
        logger.addFilter(quiet)
        try:
            with caplog.at_level(logging.WARNING, logger=_FAILURE_LOGGER):
                logger.warning("Sending process %s closing signal %s", 101, "SIGTERM")
                logger.error("failed (exitcode: %s) local_rank: %s", status, 0)
                quiet.release()
        finally:
            logger.removeFilter(quiet)
        return [record.getMessage() for record in caplog.records]

    assert torchrun_closes_after(2) == []
    assert torchrun_closes_after(1) == ["Sending process 101 closing signal SIGTERM",
                                        "failed (exitcode: 1) local_rank: 0"]

def test_config_errors_reach_torchruns_failure_summary(tmp_path):
    """Each rank records its error: lines for torchrun, whose summary shows them where it
    would show a traceback."""
    result = _torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), *TRAIN,
                       *SMALL_RUN, "trainer.precision=fp8", "optim.schedule=step",
                       f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith(
        "error: trainer.precision='fp8' is not one of auto, fp32, bf16, fp16\n"
        "error: optim.schedule='step' is not one of cosine, linear, wsd, constant\n")
    summary = result.stderr.split("Root Cause (first observed failure):")[1]
    assert "traceback : error: trainer.precision='fp8'" in summary
    assert "error: optim.schedule='step'" in summary and "Traceback" not in summary


def _run_slurm_template(tmp_path: Path, *overrides: str) -> list[str]:
    """Run launch/slurm_train.sbatch with stand-ins for scontrol and srun on a two-node job
    (id 42) and this interpreter as SCALEFORGE_PYTHON; returns the arguments srun got."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (stubs / "srun").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'srun_args'}\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    template = Path(__file__).parents[1] / "launch" / "slurm_train.sbatch"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2",
           "SCALEFORGE_PYTHON": sys.executable}
    result = subprocess.run(["bash", str(template), *overrides],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return (tmp_path / "srun_args").read_text().split()


def test_slurm_template_starts_one_torchrun_per_node_with_rendezvous_on_the_first(tmp_path):
    args = _run_slurm_template(tmp_path, "parallel.tp=8", "parallel.dp_shard=-1")
    assert args[:2] == ["--kill-on-bad-exit=1", sys.executable]
    line = " ".join(args)
    for expected in ("-m torch.distributed.run", "--nnodes 2", "--nproc-per-node 8",
                     "--rdzv-backend c10d", "--rdzv-endpoint node-a:29500", "--rdzv-id 42",
                     "-m scaleforge.launch.train run_dir=runs/slurm-42 parallel.tp=8 "
                     "parallel.dp_shard=-1"):
        assert expected in line


def test_slurm_template_passes_only_flags_the_installed_torchrun_accepts(tmp_path):
    args = _run_slurm_template(tmp_path)
    start, end = args.index("torch.distributed.run"), args.index("scaleforge.launch.train")
    flags = [arg for arg in args[start + 1:end] if arg.startswith("--")]
    assert "--signals-to-handle" in flags  # the preemption path needs it on every version
    usage = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    accepted = set(re.findall(r"--[a-z][a-z0-9_-]*", usage))
    assert not set(flags) - accepted, f"torch {torch.__version__}'s torchrun lacks these"
    template = (Path(__file__).parents[1] / "launch" / "slurm_train.sbatch").read_text()
    if "--shutdown-timeout" in accepted:
        assert "--shutdown-timeout" in flags
    else:
        assert "--shutdown-timeout" in template  # passed where the installed torchrun has it


def test_slurm_template_names_the_python_it_cannot_find(tmp_path):
    env = {**os.environ, "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node-a",
           "SLURM_NNODES": "1", "SCALEFORGE_PYTHON": "no-venv/bin/python"}
    template = Path(__file__).parents[1] / "launch" / "slurm_train.sbatch"
    result = subprocess.run(["bash", str(template)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "SCALEFORGE_PYTHON=no-venv/bin/python" in result.stderr, result.stderr
    assert "export SCALEFORGE_PYTHON=" in result.stderr
