"""The project's commands (sf-train, sf-preprocess, sf-sweep, torchrun) run as a user runs
them, in a subprocess, for the end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from scaleforge.core.fault_injection import VARIABLE

# The virtual environment's scripts: the commands pip installed with the project.
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for torchrun's --master-port and
    --rdzv-endpoint)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_thread_env() -> dict[str, str]:
    """This process's environment with OMP_NUM_THREADS=1, for a command that starts several
    training processes on a few cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_tool(tool: str, *arguments: str, cwd: Path, timeout: float = 900,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed command `tool` with `arguments` in `cwd` to its end; its output is
    captured as text. `env` defaults to this process's environment."""
    return subprocess.run([str(BIN / tool), *arguments], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_tool(tool: str, *arguments: str, cwd: Path,
               env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the installed command `tool` with `arguments` in `cwd` and return at once;
    stdout and stderr are pipes of text (read them with communicate())."""
    return subprocess.Popen([str(BIN / tool), *arguments], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def hang_drill(cwd: Path, processes: int, *arguments: str, fault: str,
               hang_timeout_s: float) -> tuple[str, float, str]:
    """torchrun with `processes` sf-train workers (`arguments`: their overrides), one
    thread each, `trainer.hang_timeout_s` and the drill `fault` (SCALEFORGE_INJECT_FAULT),
    run to its end, which must be a failure with exactly one `hang: ` line on stderr:
    (stderr, the time it ended, that line)."""
    job = start_tool(
        "torchrun", "--nproc-per-node", str(processes), "--max-restarts", "0",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "-m", "scaleforge.launch.train", *arguments, f"trainer.hang_timeout_s={hang_timeout_s}",
        cwd=cwd, env={**one_thread_env(), VARIABLE: fault},
    )
    _, stderr = job.communicate(timeout=600)
    ended = time.time()
    assert job.returncode != 0, stderr[-3000:]
    verdicts = [line for line in stderr.splitlines() if line.startswith("hang: ")]
    assert len(verdicts) == 1, stderr[-3000:]
    return stderr, ended, verdicts[0]
