"""What an attention kernel is: one object per backend that attends, builds its own masks and
declares what it supports; and the one check that asks a kernel whether it runs a config.

A kernel computes causal attention of q (B, n_heads, T, hd) over k, v (B, n_kv_heads, T, hd)
and returns (B, n_heads, T, hd), kv head j serving query heads j*r .. j*r + r-1 (r = n_heads /
n_kv_heads, Hugging Face's repeat_kv order). Each attention module holds its own kernel
(`Attention.kernel`), made with the module's sliding window; context parallelism replaces it
by a kernel that wraps it (parallel/context_parallel.py).

Masks: `mask(document_ids, seq_len, device, dtype)` builds, once per forward, whatever the
kernel's call takes (a boolean tensor, a BlockMask, varlen offsets, None for the kernel's own
causal flag); kernels with the same `mask_key` share it, so a model builds each distinct mask
once for all its layers (`masks_for`).

Adding a kernel: a file with a subclass (its `name`, `supports`, `mask`, `__call__`, and
`missing` when it needs a package) and its line in the registry (models/attention/__init__.py).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from scaleforge.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Supports:
    """What a kernel runs: on which devices ("cpu", "cuda") and precisions, and whether it
    takes grouped-query heads (without copies of K and V), a sliding window, per-document
    masks and context parallelism (a wrapping kernel that attends over the cp group)."""

    devices: tuple[str, ...] = ("cpu", "cuda")
    precisions: tuple[str, ...] = PRECISIONS
    grouped_query: bool = True
    sliding_window: bool = True
    documents: bool = True
    context_parallel: bool = False


@dataclass(frozen=True)
class AttentionRun:
    """What a run asks of its attention; a field left None is not known yet and not checked."""

    device_type: str | None = None
    precision: str | None = None
    grouped_query: bool = False
    sliding_window: int | None = None
    document_masking: bool = False
    cp: int = 1


class AttentionKernel:
    """One attention backend (see the module docstring); `window` is the sliding window
    (query i sees keys i - window + 1 .. i; None: every key before it)."""

    name: ClassVar[str]
    supports: ClassVar[Supports] = Supports()

    def __init__(self, window: int | None = None):
        self.window = window

    @classmethod
    def missing(cls) -> str | None:
        """What this machine lacks to run the kernel (a package and how to install it)."""
        return None

    @property
    def mask_key(self) -> Hashable:
        """Kernels with equal keys take the same mask (built once per forward)."""
        return (type(self), self.window)

    def mask(self, document_ids: torch.Tensor | None, seq_len: int, device: torch.device,
             dtype: torch.dtype) -> Any:
        """What the call needs for a batch of `seq_len` positions: the causal mask,
        restricted to each document when `document_ids` (B, seq_len) is given and to the
        window when there is one; None where the kernel's own causal flag is the mask.
        `dtype`: the activations' (for an additive mask)."""
        return None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: Any) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window})"


def masks_for(kernels: Sequence[AttentionKernel], document_ids: torch.Tensor | None,
              seq_len: int, device: torch.device, dtype: torch.dtype) -> list[Any]:
    """Each kernel's mask, each distinct one (by `mask_key`) built once."""
    built: dict[Hashable, Any] = {}
    for kernel in kernels:
        if kernel.mask_key not in built:
            built[kernel.mask_key] = kernel.mask(document_ids, seq_len, device, dtype)
    return [built[kernel.mask_key] for kernel in kernels]


def refusal(kernel: type[AttentionKernel], run: AttentionRun, setting: str) -> str | None:
    """Why `kernel` (the value of `setting`) cannot run `run`, in words; None: it can."""
    s, named = kernel.supports, f"{setting}={kernel.name}"
    if run.device_type is not None and run.device_type not in s.devices:
        devices = " or ".join(device.upper() for device in s.devices)
        return f"{named} runs on {devices} only and this run's device is {run.device_type}"
    if run.precision is not None and run.precision not in s.precisions:
        return (f"{named} computes in {' or '.join(s.precisions)} only and "
                f"trainer.precision={run.precision}")
    for asked, supported, what, took in (
        (run.grouped_query, s.grouped_query, "model.n_kv_heads < n_heads", "grouped-query heads"),
        (run.sliding_window is not None, s.sliding_window,
         f"model.sliding_window={run.sliding_window}", "sliding window"),
        (run.document_masking, s.documents, "data.document_masking=true", "document mask"),
    ):
        if asked and not supported:
            return f"{named} with {what}: {kernel.name} takes no {took}"
    if run.cp > 1 and not s.context_parallel:
        return (f"parallel.cp={run.cp} with {named}: it has no context-parallel form "
                "(attention over the keys gathered from the cp group)")
    missing = kernel.missing() if run.device_type is not None else None
    return None if missing is None else f"{named} needs {missing}"


def check_kernel(registry: Mapping[str, type[AttentionKernel]], name: str, run: AttentionRun,
                 setting: str) -> None:
    """Raise ConfigError, in one line ending in what would fix it, when the kernel `name` of
    `registry` (the value of `setting`) cannot run `run`. The fix names the registry's
    kernels that can, and a precision the kernel computes in."""
    reason = refusal(registry[name], run, setting)
    if reason is None:
        return
    fixes = []
    s = registry[name].supports
    if run.precision is not None and run.precision not in s.precisions:
        fixes.append(f"set trainer.precision={s.precisions[0]}")
    others = [other for other, kernel in registry.items()
              if other != name and refusal(kernel, run, setting) is None]
    if others:
        fixes.append(f"use {setting}={' or '.join(others)}")
    raise ConfigError(f"{reason}; {', or '.join(fixes) or 'no kernel here runs this'}")
