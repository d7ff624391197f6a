"""muP, the maximal update parametrization (Yang et al. 2022, "Tensor Programs V"), for Adam.

`model.mup.base_width` (a d_model) makes the model a muP model whose base shape is the
model of that width: at d_model == base_width it trains exactly like the standard
parametrization (SP), and as the width grows by m = d_model / base_width the update of
every layer keeps its size, so a learning rate tuned on the small proxy transfers to the
wide model. null: the standard parametrization, no change anywhere.

The rules (the `mup` package's practice for Adam: `MuAdam` and `MuReadout`; its Table 8):
- hidden weights (every matrix inside a block: attention q, k, v, o and the MLP's; both
  fan-in and fan-out grow with width): init std x m^-1/2 (fan-in scaling) and Adam learning
  rate x 1/m;
- input embeddings (token, position) and every vector (norm weights, biases): unchanged;
- the readout (LM head): its input multiplied by 1/m (MuReadout's output multiplier, folded
  in front of the matmul: (h / m) W == (h W) / m), weight init and learning rate unchanged.
  A tied head shares the embedding and takes the same multiplier (MuSharedReadout);
- attention scores q.k / d_head instead of q.k / sqrt(d_head), times sqrt(base_head_dim)
  (the attention multiplier) so the base shape matches SP: each query is scaled by
  sqrt(base_head_dim / d_head) before the kernel's usual 1/sqrt(d_head), which works for
  every attention kernel and under context parallelism unchanged.

`model.mup.base_head_dim`: the head width of the base shape; null derives it as this
model's head width x base_width / d_model (the base keeps the head count and each head
narrows, as in the `mup` package's coordinate checks). A sweep whose shapes keep a fixed
head width and add heads sets it to that width (the query scale is then 1: d_head is not a
width that grows).

muP covers the dense decoder families whose attention is models/transformer.py's
`Attention` (llama, gpt); Mixture-of-Experts routers and latent attention have no muP
rules here and are refused at start, as are LoRA adapters (models/lora.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scaleforge.errors import ConfigError

if TYPE_CHECKING:
    from scaleforge.models.config import TransformerConfig

HIDDEN_PREFIX = "layers."  # parameters inside the blocks (single-process names)


@dataclass
class MupConfig:
    """`model.mup.*` (the module docstring says what each does)."""

    base_width: int | None = None  # the base shape's d_model; null: standard parametrization
    base_head_dim: int | None = None  # the base shape's head width; null: derived

    @property
    def enabled(self) -> bool:
        return self.base_width is not None


def check_mup(cfg: TransformerConfig, prefix: str = "model") -> None:
    """Raise ConfigError naming the first invalid `model.mup.*` setting."""
    mup = cfg.mup
    if mup.base_width is None:
        if mup.base_head_dim is not None:
            raise ConfigError(
                f"{prefix}.mup.base_head_dim={mup.base_head_dim} without "
                f"{prefix}.mup.base_width: set base_width (a d_model) to use muP, or leave "
                "base_head_dim null"
            )
        return
    if mup.base_width <= 0:
        raise ConfigError(
            f"{prefix}.mup.base_width={mup.base_width} must be a positive width (the base "
            "shape's d_model), or null for the standard parametrization"
        )
    if mup.base_head_dim is not None and mup.base_head_dim <= 0:
        raise ConfigError(
            f"{prefix}.mup.base_head_dim={mup.base_head_dim} must be positive, or null to "
            "derive it from base_width"
        )
    if cfg.lora.enabled:
        raise ConfigError(
            f"{prefix}.mup.base_width={mup.base_width} with {prefix}.lora.rank="
            f"{cfg.lora.rank}: muP has no rules for low-rank adapters here (their rank does not "
            f"grow with width); set {prefix}.lora.rank=0 or {prefix}.mup.base_width=null"
        )
    if cfg.moe.enabled:
        raise ConfigError(
            f"{prefix}.mup.base_width={mup.base_width} with {prefix}.moe.num_experts="
            f"{cfg.moe.num_experts}: muP has no rules for expert routers here; set "
            f"{prefix}.moe.num_experts=0 or {prefix}.mup.base_width=null"
        )


def width_multiplier(cfg: TransformerConfig) -> float:
    """m = d_model / base_width (1.0 under the standard parametrization)."""
    if cfg.mup.base_width is None:
        return 1.0
    return cfg.d_model / cfg.mup.base_width


def base_head_dim(cfg: TransformerConfig) -> float:
    """The base shape's head width (module docstring)."""
    if cfg.mup.base_head_dim is not None:
        return float(cfg.mup.base_head_dim)
    return cfg.head_size / width_multiplier(cfg)


def query_scale(cfg: TransformerConfig) -> float:
    """What each query is multiplied by before the kernel's 1/sqrt(d_head), so the scores are
    sqrt(base_head_dim) q.k / d_head; 1.0 under SP."""
    if cfg.mup.base_width is None:
        return 1.0
    return math.sqrt(base_head_dim(cfg) / cfg.head_size)


def output_multiplier(cfg: TransformerConfig) -> float:
    """What the LM head's input is multiplied by: 1/m (1.0 under SP)."""
    return 1.0 / width_multiplier(cfg)


def is_hidden(name: str, ndim: int) -> bool:
    """Whether parameter `name` (its single-process name) of `ndim` dimensions is a hidden
    weight: a matrix inside a block."""
    return name.startswith(HIDDEN_PREFIX) and ndim >= 2


def init_std_scale(cfg: TransformerConfig, name: str, ndim: int) -> float:
    """The factor on parameter `name`'s SP init std: m^-1/2 for hidden weights, else 1."""
    return width_multiplier(cfg) ** -0.5 if is_hidden(name, ndim) else 1.0


def lr_scale(cfg: TransformerConfig, name: str, ndim: int) -> float:
    """The factor on parameter `name`'s Adam learning rate: 1/m for hidden weights, else 1."""
    return 1.0 / width_multiplier(cfg) if is_hidden(name, ndim) else 1.0
