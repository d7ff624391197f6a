"""Mixed precision: fp32 master weights always; bf16 or fp16 compute through autocast.

fp16 needs dynamic loss scaling (torch.amp.GradScaler) and CUDA; bf16 needs neither.
"""

from __future__ import annotations

import contextlib
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
