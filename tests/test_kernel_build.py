"""The kernels' build cannot hang or take other tests down (bench/gpu_check.sh's two failure
modes on a GPU window): a build killed mid-way leaves torch's FileBaton `lock`, and the next
`import scaleforge.csrc` must not wait on it forever (csrc/extension.py clears it under a
lock of its own); and a build that fails skips the kernel tests alone, the others of the
same `pytest -m cuda` run still run (tests/test_kernels.py imports the kernels lazily).

Each test builds in a fresh cache folder (XDG_CACHE_HOME) and makes the compiler fail on
purpose, so none of them compiles the library (minutes on two cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMPORT = [sys.executable, "-c", "import scaleforge.csrc"]


def _env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(cache), **extra}


def _wait_for(pattern: str, root: Path, process: subprocess.Popen, timeout_s: float) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        if process.poll() is not None:
            raise AssertionError(f"the build ended (exit {process.returncode}) before {pattern}")
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} under {root} within {timeout_s} s")


def test_a_build_killed_mid_way_does_not_block_the_next_import(tmp_path):
    """SIGKILL to the building process group while torch's lock is held (as `timeout -s
    KILL` or a cut GPU window would), then `import scaleforge.csrc` again: it returns within
    60 s (here with the compiler made to fail: an error, not a wait) and the stale lock is
    gone."""
    # A compiler that takes its time: the build is surely under way when it is killed.
    slow = tmp_path / "slow-c++"
    slow.write_text("#!/bin/sh\nsleep 600\n")
    slow.chmod(0o755)
    first = subprocess.Popen(IMPORT, env=_env(tmp_path, CXX=str(slow)), cwd=tmp_path,
                             start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = _wait_for("scaleforge/kernels/*/lock", tmp_path, first, timeout_s=240)
        time.sleep(1.0)  # ninja and the compiler started
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert lock.exists(), "the killed build left no lock: the case under test did not happen"

    start = time.monotonic()
    second = subprocess.run(IMPORT, env=_env(tmp_path, CXX="false"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 60
    assert second.returncode != 0 and "KernelBuildError" in second.stderr, second.stderr[-2000:]
    assert "building the scaleforge kernels" in second.stderr
    assert not lock.exists()


def test_a_failed_build_skips_only_the_kernel_tests(tmp_path):
    """With no compiler, the kernel tests are skipped (SCALEFORGE_KERNELS_OPTIONAL=1, as
    gpu_check.sh runs them) and the other tests of the same run pass; `pytest -m cuda` over
    every file gpu_check.sh gives it collects without an error."""
    env = _env(tmp_path, CXX="/nonexistent/c++", SCALEFORGE_KERNELS_OPTIONAL="1")
    selected = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "tests/test_kernels.py", "tests/test_moe.py",
         "-k", "test_rms_norm_matches_torch or test_opcheck or pad_groups"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = selected.stdout + selected.stderr
    assert selected.returncode == 0, output[-3000:]
    assert "1 passed" in output, output[-3000:]  # test_moe's pad_groups test
    assert "the kernels could not be built" in output and "ERROR" not in output

    cuda_files = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py")
                        if "mark.cuda" in path.read_text())
    assert "tests/test_kernels.py" in cuda_files
    marked = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "--collect-only",
         "-p", "no:cacheprovider", *cuda_files],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = marked.stdout + marked.stderr
    assert marked.returncode == 0, output[-3000:]
    assert "ERROR" not in output and "error" not in output.splitlines()[-1], output[-3000:]
    assert "tests/test_moe.py::" in output and "tests/test_kernels.py::" in output
