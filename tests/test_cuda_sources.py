"""The CUDA kernels compile: every csrc/cuda/*.cu to an object file for sm_90 (Hopper) with
the nvcc on this machine, so a CUDA syntax or type error fails CI even where torch has no
CUDA. The .cu files include no torch header (cuda/launchers.h), which is what lets them
build against a CPU-only torch. Skipped where nvcc is not installed; one nvcc call for all
files (about 17 s on 2 cores)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from scaleforge.csrc.extension import CUDA_SOURCES, SOURCE_DIR

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_every_cuda_kernel_compiles_for_sm90(tmp_path):
    kernels = sorted(SOURCE_DIR.glob("cuda/*.cu"))
    assert {f"cuda/{path.name}" for path in kernels} <= set(CUDA_SOURCES)
    assert kernels, "no .cu file found"
    command = [str(NVCC), "-c", "-arch=sm_90", "-std=c++17", "-O3", f"-I{SOURCE_DIR}",
               *map(str, kernels)]
    built = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert sorted(path.name for path in Path(tmp_path).glob("*.o")) == sorted(
        f"{path.stem}.o" for path in kernels)


def test_cuda_kernels_include_no_torch_header():
    for path in [*SOURCE_DIR.glob("cuda/*.cu"), *SOURCE_DIR.glob("cuda/*.cuh"),
                 SOURCE_DIR / "cuda" / "launchers.h"]:
        includes = [line for line in path.read_text().splitlines() if line.startswith("#include")]
        assert not any("torch" in line or "ATen" in line or "c10" in line for line in includes), (
            path.name, includes)
