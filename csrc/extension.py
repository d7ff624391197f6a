"""Builds the kernel library from the C++/CUDA sources beside this file and loads it.

`load()` compiles with torch.utils.cpp_extension (ninja) on first use into
$XDG_CACHE_HOME/scaleforge/kernels/<key> (~/.cache by default), the key being torch's
version, whether CUDA is built and a hash of every source and header: a later process, or
a later session, loads the built library without compiling, and an edit to any source
builds afresh. The CUDA sources join when torch was built with CUDA and nvcc is found; a
machine with a GPU but no nvcc is refused. Loading registers the `scaleforge` operators
with torch's dispatcher (TORCH_LIBRARY in registration.cpp); nothing else is imported.

A build killed mid-way (a `timeout`, a cut GPU window, Ctrl-C) leaves torch's FileBaton
file `<build dir>/lock`, on which every later build waits forever. `load()` therefore holds
an advisory lock of its own (`flock` on `<build dir>/build.flock`, which the kernel releases
when its holder dies) around torch's, and a `lock` file found while holding it is stale: it
is removed before building (`_build_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

from scaleforge.errors import KernelBuildError

SOURCE_DIR = Path(__file__).resolve().parent
CPU_SOURCES = (
    "registration.cpp",
    "linear_cross_entropy.cpp",
    "cpu/rms_norm.cpp",
    "cpu/rope.cpp",
    "cpu/swiglu.cpp",
    "cpu/cross_entropy.cpp",
)
CUDA_SOURCES = (
    "cuda/binding.cpp",
    "cuda/rms_norm.cu",
    "cuda/rope.cu",
    "cuda/swiglu.cu",
    "cuda/cross_entropy.cu",
)
HEADERS = ("ops.h", "include/row_layout.h")
CUDA_HEADERS = ("cuda/launchers.h", "cuda/common.cuh")
CFLAGS = ("-O3",)
CUDA_CFLAGS = ("-O3", "--use_fast_math")

_loaded: Path | None = None


def cuda_wanted() -> bool:
    """Whether the CUDA sources join the build: torch has CUDA and nvcc is found.

    Raises KernelBuildError when a GPU is visible but nvcc is not (the operators would have
    no CUDA implementation on the machine that needs one)."""
    if torch.version.cuda is None:
        return False
    if find_nvcc() is not None:
        return True
    if torch.cuda.is_available():
        raise KernelBuildError(
            "model.kernels=fused needs nvcc to build the CUDA kernels and none was found "
            "(set CUDA_HOME or put nvcc on PATH), or use model.kernels=torch"
        )
    return False


def find_nvcc() -> str | None:
    """The nvcc that torch's build would use ($CUDA_HOME/bin/nvcc, else PATH), or None."""
    home = cpp_extension.CUDA_HOME
    candidate = Path(home) / "bin" / "nvcc" if home else None
    if candidate is not None and candidate.exists():
        return str(candidate)
    return shutil.which("nvcc")


def build_key(with_cuda: bool) -> str:
    """torch version, CUDA or not, and the first 16 hex digits of the hash of the sources,
    the flags and where the sources and torch lie (build.ninja names both: two checkouts or
    venvs sharing one folder would rebuild it for each other, in turn, on every load)."""
    digest = hashlib.sha256()
    digest.update(f"{SOURCE_DIR}\n{Path(torch.__file__).parent}\n".encode())
    names = CPU_SOURCES + HEADERS + (CUDA_SOURCES + CUDA_HEADERS if with_cuda else ())
    for name in names:
        digest.update(name.encode())
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(" ".join(CFLAGS + CUDA_CFLAGS).encode())
    flavour = "cuda" if with_cuda else "cpu"
    return f"torch{torch.__version__.replace('+', '_')}-{flavour}-{digest.hexdigest()[:16]}"


def build_directory(key: str) -> Path:
    """Where the library with this key is built and cached."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "scaleforge" / "kernels" / key


def check_toolchain() -> None:
    """Raise KernelBuildError naming the first missing build tool (compiler, ninja)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(
            f"model.kernels=fused needs a C++ compiler to build its kernels and {compiler!r} "
            "was not found (install g++ or set CXX), or use model.kernels=torch"
        )
    if not cpp_extension.is_ninja_available():
        raise KernelBuildError(
            "model.kernels=fused needs ninja to build its kernels and it was not found "
            "(pip install ninja), or use model.kernels=torch"
        )


def load() -> Path:
    """Build (first time only) and load the kernel library; returns its build directory.

    Raises KernelBuildError with one line naming what is missing or where the build failed.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    with_cuda = cuda_wanted()
    check_toolchain()
    directory = build_directory(build_key(with_cuda))
    directory.mkdir(parents=True, exist_ok=True)
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    defines = ["-DSCALEFORGE_WITH_CUDA"] if with_cuda else []
    try:
        with _build_lock(directory):
            cpp_extension.load(
                name="scaleforge_kernels",
                sources=[str(SOURCE_DIR / name) for name in sources],
                extra_cflags=[*CFLAGS, *defines],
                extra_cuda_cflags=[*CUDA_CFLAGS, *defines],
                build_directory=str(directory),
                is_python_module=False,
                verbose=False,
            )
    # SubprocessError: torch asks a broken compiler its version before it builds.
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise KernelBuildError(
            f"building the scaleforge kernels in {directory} failed ({first_line}); see "
            f"{directory}/build.ninja, or use model.kernels=torch"
        ) from error
    _loaded = directory
    return directory


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Within the block this process alone builds in `directory` (other processes wait
    here, as they would on torch's FileBaton); torch's `lock` file left there by a build that
    died is removed first."""
    with open(directory / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by close, or by the holder's death
        try:
            (directory / "lock").unlink(missing_ok=True)  # stale: its builder is gone
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
