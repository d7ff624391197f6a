"""AdamW with weight decay on matrices only, using torch's fused or foreach kernels.

Host syncs (torch 2.13): no implementation reads the device in `step`. `fused` (auto's
choice on CPU and CUDA) keeps each parameter's `step` counter on its device, and with fp16
loss scaling GradScaler hands it the on-device inf flag. `foreach` and `for_loop` keep
`step` on the host and compute the bias corrections there (still no device read), but with
fp16 loss scaling GradScaler then reads the inf flag on the host (`.item()`) before every
update; prefer `fused` there. `capturable` (step counters on the device for foreach) is
only needed for CUDA graphs, which ScaleForge does not capture.
"""

from __future__ import annotations

import torch
from torch import nn

from scaleforge.core.config import OptimConfig


def _implementation_kwargs(implementation: str, device_type: str) -> dict:
    """Keyword arguments selecting AdamW's kernel. auto: fused on CPU and CUDA, else foreach."""
    if implementation == "auto":
        implementation = "fused" if device_type in ("cpu", "cuda") else "foreach"
    return {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for_loop": {"foreach": False},
    }[implementation]


def build_optimizer(model: nn.Module, optim: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters.

    Matrices (embeddings included, as in GPT-2 and nanoGPT) are decayed; vectors (norm
    weights, biases) are not. Tied weights appear once.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        **_implementation_kwargs(optim.implementation, device_type),
    )
