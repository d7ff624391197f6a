"""Mixed precision: fp32 master weights always; bf16 or fp16 compute through autocast.
The default, `trainer.precision=auto`, is bf16 on CUDA and fp32 on CPU (`resolve_precision`).

fp16 needs dynamic loss scaling (torch.amp.GradScaler) and CUDA; bf16 needs neither.

Also how float32 matmuls and nondeterministic kernels run (`set_numerics`): on CUDA, fp32
matmuls use TF32 tensor cores unless `trainer.tf32=false` (the fp32 compute of
precision=fp32 at 494 instead of 67 TFLOP/s on an H100), and deterministic kernels are
opt-in (`trainer.deterministic`), since they cost speed there; on CPU runs are bitwise
repeatable by default and TF32 does not apply.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from scaleforge.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """How a step computes: `autocast()` wraps forward passes; `scaler` is set for fp16."""

    name: str
    autocast: Callable[[], AbstractContextManager]
    scaler: torch.amp.GradScaler | None


def check_precision_device(name: str, device: torch.device) -> None:
    """Raise ConfigError when precision `name` cannot run on `device` (fp16 needs CUDA)."""
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            "trainer.precision=fp16 needs CUDA (dynamic loss scaling); use bf16 or fp32 on "
            f"{device.type}"
        )


def resolve_precision(name: str, device: str) -> str:
    """`trainer.precision` for a run on `device` (the `trainer.device` setting): auto is bf16
    on CUDA and fp32 on a CPU, where bf16 matmuls are often emulated and several times slower
    (`cpu_bf16_warning`); any other name is returned as it is."""
    if name != "auto":
        return name
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16" if device == "cuda" else "fp32"


def build_precision(name: str, device: torch.device) -> Precision:
    """Precision policy `name` (fp32 | bf16 | fp16) on `device`."""
    if name == "fp32":
        return Precision(name, contextlib.nullcontext, None)
    check_precision_device(name, device)
    dtype = _DTYPES[name]

    def autocast() -> AbstractContextManager:
        return torch.autocast(device_type=device.type, dtype=dtype)

    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return Precision(name, autocast, scaler)


def resolve_deterministic(setting: bool | None, device: torch.device) -> bool:
    """The `trainer.deterministic` setting: None (auto) is true on CPU (bitwise repeatable
    runs, what the tests compare) and false on CUDA (where deterministic kernels are slower)."""
    return device.type == "cpu" if setting is None else setting


def set_numerics(deterministic: bool | None, tf32: bool, device: torch.device) -> None:
    """Configure this process's kernels for a run on `device` (call before building the model).

    deterministic (resolved by `resolve_deterministic`): torch's deterministic algorithms in
    strict mode, so an op without a deterministic kernel raises instead of warning. On CUDA
    also cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG=:4096:8, unless set; it must be in
    place before the first matmul), and SDPA then takes its deterministic flash or
    memory-efficient backward and never cuDNN attention (torch's randomness notes); torch's
    NaN-filling of every torch.empty (fill_uninitialized_memory, a debugging aid that also
    fills FSDP's buffers) is turned off there. Off: torch's default kernels.
    tf32: float32 matmuls and convolutions on CUDA run on TF32 tensor cores (10-bit
    mantissa, fp32 range); false for strict IEEE fp32. Nothing changes on CPU.
    """
    deterministic = resolve_deterministic(deterministic, device)
    if device.type == "cuda":
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
        _set_cuda_tf32(tf32)
    torch.use_deterministic_algorithms(deterministic)


def _set_cuda_tf32(enabled: bool) -> None:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; mixing it with allow_tf32 raises
        precision = "tf32" if enabled else "ieee"
        matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision  # type: ignore[attr-defined]
    else:
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    """Whether CUDA float32 matmuls run on TF32 tensor cores (which peak FLOP/s applies)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return bool(matmul.fp32_precision == "tf32")
    return bool(matmul.allow_tf32)


# bf16 matmuls this many times slower than fp32 ones mean the CPU emulates bf16 (measured
# 0.5x on a Xeon with AVX512-BF16; emulation is several times slower; the margin keeps a
# busy machine's timing noise from raising the warning).
SLOW_BF16_RATIO = 2.5


def cpu_bf16_slowdown(size: int = 512, repeats: int = 5) -> float:
    """How many times longer a (size x size) bf16 matmul takes than an fp32 one on this CPU,
    measured now (best of `repeats` each; a few milliseconds on a CPU with bf16 units)."""
    timings = []
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size).to(dtype)
        torch.mm(a, a)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, a)
            best = min(best, time.perf_counter() - started)
        timings.append(best)
    return timings[1] / max(timings[0], 1e-9)


def cpu_bf16_warning(precision: str, device: torch.device) -> str | None:
    """A one-line warning when a run would compute in bf16 on a CPU that emulates it (its
    bf16 matmuls measured SLOW_BF16_RATIO times slower than fp32 or more); None otherwise."""
    if precision != "bf16" or device.type != "cpu":
        return None
    slowdown = cpu_bf16_slowdown()
    if slowdown < SLOW_BF16_RATIO:
        return None
    return (f"warning: trainer.precision=bf16 on a CPU without bf16 units: a bf16 matmul "
            f"measured {slowdown:.1f}x slower than fp32 here; trainer.precision=fp32 trains "
            "faster on this machine")
