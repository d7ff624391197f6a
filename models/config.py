"""The one model configuration shared by every decoder family."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from scaleforge.errors import ConfigError
from scaleforge.models.attention import BACKENDS as ATTENTION_BACKENDS
from scaleforge.models.moe import MoEConfig

FAMILIES = ("llama", "gpt")
KERNELS = ("auto", "torch", "fused")  # models/kernels.py


@dataclass
class TransformerConfig:
    """Shape of a decoder-only transformer.

    `family` picks the block: "llama" (RMSNorm, RoPE, SwiGLU, grouped-query attention) or
    "gpt" (LayerNorm, learned positions, GELU MLP, tied embeddings, biases).
    `kernels` picks the code of RMSNorm, RoPE, SwiGLU and the training loss: "torch",
    "fused" (the csrc/ operators) or "auto" (models/kernels.py); the gpt family has none of
    the first three, only the loss.
    `ffn_hidden` of None derives the MLP width: 4*d_model for gpt; for llama 2/3 of
    4*d_model times `ffn_multiplier`, rounded up to a multiple of `ffn_multiple_of` (Llama's rule).
    `attention` picks the kernel: "sdpa", "flash" or "flex" (models/attention.py).
    `moe` makes layers Mixture-of-Experts (models/moe.py; num_experts 0: dense).
    `rope_per_document` restarts the RoPE positions at 0 at each document of a packed row
    (llama; the model is then given document ids, data.document_masking=true).
    """

    name: str = "custom"
    family: str = "llama"
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    ffn_multiplier: float = 1.0
    ffn_multiple_of: int = 256
    vocab_size: int = 4096
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: str = "sdpa"
    rope_per_document: bool = False
    kernels: str = "auto"
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def mlp_hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.family == "gpt":
            return 4 * self.d_model
        hidden = int(self.ffn_multiplier * int(2 * 4 * self.d_model / 3))
        return self.ffn_multiple_of * -(-hidden // self.ffn_multiple_of)

    def check(self, prefix: str = "model") -> None:
        """Raise ConfigError naming the first inconsistent field (`prefix.field`)."""
        if self.kernels not in KERNELS:
            raise ConfigError(
                f"{prefix}.kernels={self.kernels!r} is unknown; use one of {KERNELS}"
            )
        if self.family not in FAMILIES:
            raise ConfigError(f"{prefix}.family={self.family!r} is unknown; use one of {FAMILIES}")
        for field in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{prefix}.{field}={getattr(self, field)} must be positive")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"{prefix}.n_heads={self.n_heads} does not divide {prefix}.d_model={self.d_model}; "
                f"pick a head count that divides {self.d_model}"
            )
        if self.head_dim % 2 and self.family == "llama":
            raise ConfigError(
                f"{prefix}.d_model/{prefix}.n_heads={self.head_dim} is odd; RoPE needs an even "
                "head dimension"
            )
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ConfigError(
                f"{prefix}.n_kv_heads={self.n_kv_heads} must divide {prefix}.n_heads={self.n_heads}"
            )
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"{prefix}.attention={self.attention!r} is not one of "
                f"{', '.join(ATTENTION_BACKENDS)}"
            )
        if self.rope_per_document and self.family != "llama":
            raise ConfigError(
                f"{prefix}.rope_per_document=true: the {self.family} family has learned "
                "positions, not RoPE; leave it false"
            )
        self.moe.check(f"{prefix}.moe", self.family, self.n_layers)
        if self.family == "gpt" and self.kv_heads != self.n_heads:
            raise ConfigError(
                f"{prefix}.n_kv_heads={self.n_kv_heads}: the gpt family has no grouped-query "
                "attention; leave it null"
            )


def as_transformer_config(
    cfg: TransformerConfig | DictConfig | Mapping[str, Any],
) -> TransformerConfig:
    """Accept the model config in any form a caller holds it: the dataclass, an omegaconf
    DictConfig (Hydra's `cfg.model`) or a plain dict. Unknown keys raise ConfigError."""
    if isinstance(cfg, TransformerConfig):
        return cfg
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    assert isinstance(plain, Mapping)  # a DictConfig converts to a dict
    settings = {str(key): value for key, value in plain.items()}
    known = {f.name for f in fields(TransformerConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]} is not a model setting; the settings are "
            f"{', '.join(sorted(known))}"
        )
    if isinstance(settings.get("moe"), Mapping):
        settings["moe"] = as_moe_config(settings["moe"])
    return TransformerConfig(**settings)


def as_moe_config(settings: Mapping[str, Any]) -> MoEConfig:
    """`model.moe` from a plain dict; unknown keys raise ConfigError."""
    known = {f.name for f in fields(MoEConfig)}
    unknown = sorted(set(map(str, settings)) - known)
    if unknown:
        raise ConfigError(
            f"model.moe.{unknown[0]} is not a MoE setting; the settings are "
            f"{', '.join(sorted(known))}"
        )
    return MoEConfig(**{str(key): value for key, value in settings.items()})
