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
from scaleforge.models.config import TransformerConfig
from scaleforge.models.init import canonical_name
from scaleforge.models.mup import lr_scale


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
