"""LoRA (Hu et al. 2021): low-rank adapters on a frozen model, `model.lora.*`.

A targeted projection y = x W^T + b becomes

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T,    A (rank, in), B (out, rank)

with W and b (and every other weight of the model) frozen and only A and B trained. B starts
at zero, so the adapted model starts as the base model; A ~ N(0, 1/in) (models/init.py).
`apply_lora` is a model transform: it swaps each targeted `nn.Linear` for a `LoRALinear`
(an nn.Linear subclass, so the weight keeps its name and tensor parallelism's column/row
plans apply to it: a column-split projection splits A by rank and B by output rows, a
row-split one replicates A and B; DTensor runs the adapter's matmuls on those layouts) and
freezes the rest. `merged_state_dict` folds the adapters into the weights for export
(W + alpha/rank B A). Adapter parameters are named `<projection>.lora_a` / `.lora_b`.

Targets name projections: `attention` (wq, wk, wv, wo), `mlp` (the dense feed-forward's w1,
w2, w3), or single projection names (`wq`, `w2`, ...). Mixture-of-Experts experts are not
nn.Linear and are not adapted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge.errors import ConfigError

ADAPTER_SUFFIXES = (".lora_a", ".lora_b")
# What each target group adapts: (the parent module's attribute name, projection names).
TARGET_GROUPS = {
    "attention": ("attention", ("wq", "wk", "wv", "wo")),
    "mlp": ("feed_forward", ("w1", "w2", "w3")),
}
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoRAConfig:
    """Low-rank adapters (`model.lora.*`); rank 0 (default) trains every weight."""

    rank: int = 0  # adapter rank r; 0: no adapters, full fine-tuning
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input while training
    # Projections to adapt: attention (wq, wk, wv, wo), mlp (w1, w2, w3) or single names.
    targets: list[str] = field(default_factory=lambda: ["attention", "mlp"])

    @property
    def enabled(self) -> bool:
        """Whether the model carries adapters."""
        return self.rank > 0

    @property
    def scaling(self) -> float:
        """alpha / rank: the factor on the adapters' output."""
        return self.alpha / self.rank

    def check(self, prefix: str = "model.lora") -> None:
        """Raise ConfigError naming the first field whose value is not allowed."""
        if self.rank < 0:
            raise ConfigError(f"{prefix}.rank={self.rank} must be 0 (off) or positive, e.g. 8")
        if not self.enabled:
            return
        if self.alpha <= 0:
            raise ConfigError(f"{prefix}.alpha={self.alpha} must be positive, e.g. 16")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{prefix}.dropout={self.dropout} must lie in [0, 1)")
        allowed = (*TARGET_GROUPS, *PROJECTIONS)
        unknown = [t for t in self.targets if t not in allowed]
        if unknown or not self.targets:
            raise ConfigError(
                f"{prefix}.targets={list(self.targets)}: each must be one of "
                f"{', '.join(allowed)} (and at least one given)"
            )

    def targeted(self, module_name: str) -> bool:
        """Whether the projection at `module_name` (e.g. `layers.0.attention.wq`) is adapted."""
        parent, _, leaf = module_name.rpartition(".")
        parent_leaf = parent.rpartition(".")[2]
        for target in self.targets:
            if target in TARGET_GROUPS:
                group_parent, names = TARGET_GROUPS[target]
                if parent_leaf == group_parent and leaf in names:
                    return True
            elif leaf == target and parent_leaf in ("attention", "feed_forward"):
                return True
        return False


class LoRALinear(nn.Linear):
    """An nn.Linear (frozen weight and bias) plus a trained low-rank update (module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int,
                 scaling: float, dropout: float, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.scaling = scaling
        # Functional, not an nn.Dropout child: tensor-parallel styles partition every
        # submodule of the projection as a Linear.
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        dropped = F.dropout(x, self.dropout, self.training) if self.dropout else x
        update = F.linear(F.linear(dropped, self.lora_a), self.lora_b)
        return base + update * self.scaling


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> None:
    """Swap the targeted projections of `model` (a Transformer or a stage of one, on any
    device, meta included) for LoRALinear in place and freeze every other parameter. Does
    nothing when `cfg.rank` is 0. The adapters are left uninitialised off the meta device:
    `models.init` fills them."""
    if not cfg.enabled:
        return
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and cfg.targeted(name)]
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        adapted = LoRALinear(linear.in_features, linear.out_features, linear.bias is not None,
                             cfg.rank, cfg.scaling, cfg.dropout, device=linear.weight.device,
                             dtype=linear.weight.dtype)
        adapted.weight, adapted.bias = linear.weight, linear.bias
        setattr(model.get_submodule(parent_name), leaf, adapted)
    freeze_base(model)


def is_adapter(name: str) -> bool:
    """Whether parameter `name` is a LoRA adapter matrix."""
    return name.endswith(ADAPTER_SUFFIXES)


def freeze_base(model: nn.Module) -> None:
    """With adapters present, train them only: every other parameter's requires_grad off
    (again after a parallel style replaced parameters); nothing without adapters."""
    parameters = list(model.named_parameters())
    if not any(is_adapter(name) for name, _ in parameters):
        return
    for name, param in parameters:
        param.requires_grad_(is_adapter(name))


def adapter_std(in_features: int) -> float:
    """The standard deviation A is drawn with: 1 / sqrt(in_features) (Kaiming, fan-in)."""
    return 1.0 / math.sqrt(in_features)


def merged_state_dict(state: dict[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """A full single-process state dict with adapters (`x.lora_a`, `x.lora_b`) folded into
    their weights, W + alpha/rank B A in fp32, and left out: the state of the model without
    adapters."""
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    for key in state:
        if key.endswith(".lora_a"):
            projection = key[: -len(".lora_a")]
            weight = merged[f"{projection}.weight"]
            update = state[f"{projection}.lora_b"].float() @ state[key].float()
            merged[f"{projection}.weight"] = (weight.float() + cfg.scaling * update).to(
                weight.dtype)
    return merged
