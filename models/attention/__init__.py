"""Attention kernels: one object per backend, chosen by `model.attention` (this registry).

- sdpa (sdpa.py): `F.scaled_dot_product_attention` with `enable_gqa`, any device; the one
  with a context-parallel form.
- flash (flash.py): the flash-attn package; CUDA, bf16 or fp16; varlen with documents.
- flex (flex.py): compiled `flex_attention` with a BlockMask; CUDA.

Each declares what it supports (kernel.py's `Supports`) and builds its own masks; validation
asks it (`check_attention`). A new kernel is a file with its class and one line here.
Under context parallelism parallel/ wraps each attention module's kernel in one that attends
over the cp group (parallel/context_parallel.py).
"""

from __future__ import annotations

from scaleforge.errors import check_choice
from scaleforge.models.attention.documents import document_positions, document_starts
from scaleforge.models.attention.flash import FlashKernel, VarlenDocuments, flash_installed
from scaleforge.models.attention.flex import FlexKernel
from scaleforge.models.attention.kernel import (
    AttentionKernel,
    AttentionRun,
    Supports,
    check_kernel,
    masks_for,
)
from scaleforge.models.attention.sdpa import SdpaKernel

KERNELS: dict[str, type[AttentionKernel]] = {
    "sdpa": SdpaKernel,
    "flash": FlashKernel,
    "flex": FlexKernel,
}
BACKENDS = tuple(KERNELS)  # the model.attention choices

__all__ = [
    "BACKENDS", "KERNELS", "AttentionKernel", "AttentionRun", "FlashKernel", "FlexKernel",
    "SdpaKernel", "Supports", "VarlenDocuments",
    "check_attention", "document_positions", "document_starts", "flash_installed",
    "make_kernel", "masks_for",
]


def make_kernel(name: str, window: int | None = None) -> AttentionKernel:
    """The kernel `name` (a model.attention value) with sliding window `window`."""
    return KERNELS[name](window)


def check_attention(name: str, run: AttentionRun, setting: str = "model.attention") -> None:
    """Raise ConfigError, in one line saying what would fix it, when the kernel `name` cannot
    run `run` here (device, precision, heads, window, documents, context parallelism, a
    missing package)."""
    check_choice(setting, name, tuple(KERNELS))
    check_kernel(KERNELS, name, run, setting)
