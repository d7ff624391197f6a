"""AdamW with weight decay on matrices only, using torch's fused or foreach kernels, and its
settings with the learning-rate schedule's (`optim.*`, `OptimConfig`; core/lr_schedule.py).

Host syncs (torch 2.13): no implementation reads the device in `step`. `fused` (auto's
choice on CPU and CUDA) keeps each parameter's `step` counter on its device, and with fp16
loss scaling GradScaler hands it the on-device inf flag. `foreach` and `for_loop` keep
`step` on the host and compute the bias corrections there (still no device read), but with
fp16 loss scaling GradScaler then reads the inf flag on the host (`.item()`) before every
update; prefer `fused` there. `capturable` (step counters on the device for foreach) is
only needed for CUDA graphs, which ScaleForge does not capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scaleforge.errors import ConfigError, check_choice
from scaleforge.models.config import TransformerConfig
from scaleforge.models.init import canonical_name
from scaleforge.models.mup import lr_scale

SCHEDULES = ("cosine", "linear", "wsd", "constant")
OPTIMIZER_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule. Weight decay applies to matrices only."""

    lr: float = 3e-4  # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1  # the schedule ends at lr x min_lr_ratio
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (across all ranks)
    schedule: str = "cosine"  # learning-rate decay after warmup: cosine, linear, wsd, constant
    # Linear warmup steps; more than trainer.max_steps is clamped to it (with a warning).
    warmup_steps: int = 100
    # wsd only: the fraction of the steps after warmup spent decaying at the end.
    decay_fraction: float = 0.2
    # torch's AdamW kernel: auto, fused, foreach or for_loop.
    implementation: str = "auto"

    def check(self, prefix: str = "optim") -> None:
        """Raise ConfigError naming the first field whose value is not allowed."""
        check_choice(f"{prefix}.schedule", self.schedule, SCHEDULES)
        check_choice(f"{prefix}.implementation", self.implementation, OPTIMIZER_IMPLEMENTATIONS)
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr={self.lr} must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{prefix}.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"{prefix}.decay_fraction={self.decay_fraction} must lie in (0, 1]")


def _implementation_kwargs(implementation: str, device_type: str) -> dict:
    """Keyword arguments selecting AdamW's kernel. auto: fused on CPU and CUDA, else foreach."""
    if implementation == "auto":
        implementation = "fused" if device_type in ("cpu", "cuda") else "foreach"
    return {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for_loop": {"foreach": False},
    }[implementation]


def build_optimizer(model: nn.Module, optim: OptimConfig, device_type: str,
                    model_cfg: TransformerConfig | None = None) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters.

    Matrices (embeddings included, as in GPT-2 and nanoGPT) are decayed; vectors (norm
    weights, biases) are not. Tied weights appear once. Under muP (`model_cfg.mup`) each
    parameter's learning rate is `optim.lr` times its `models.mup.lr_scale` (1/m for hidden
    weights): each group carries its factor as "lr_scale", which `set_lr` applies. The
    groups with factor 1 come first.
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        key = canonical_name(name.split(".", 1)[1] if _is_part_name(model, name) else name)
        scale = 1.0 if model_cfg is None else lr_scale(model_cfg, key, param.ndim)
        groups.setdefault((param.ndim >= 2, scale), []).append(param)
    ordered = sorted(groups.items(), key=lambda item: (item[0][1] != 1.0, not item[0][0]))
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": optim.weight_decay if decayed else 0.0,
          "lr": optim.lr * scale, "lr_scale": scale}
         for (decayed, scale), params in ordered],
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        **_implementation_kwargs(optim.implementation, device_type),
    )


def _is_part_name(model: nn.Module, name: str) -> bool:
    """Whether `name` starts with the index of one of `model`'s parts (a ModuleList of
    model parts, as the train modules hold them: "0.layers.1...")."""
    return isinstance(model, nn.ModuleList) and name.split(".", 1)[0].isdigit()
