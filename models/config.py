"""The one model configuration shared by every decoder family."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from scaleforge.errors import ConfigError, check_choice
from scaleforge.models.attention import BACKENDS as ATTENTION_BACKENDS
from scaleforge.models.deepseek_v3.config import LatentAttentionConfig
from scaleforge.models.family import family_spec
from scaleforge.models.lora import LoRAConfig
from scaleforge.models.moe import MoEConfig
from scaleforge.models.mup import MupConfig, check_mup

KERNELS = ("auto", "torch", "fused")  # models/kernels.py
ROPE_SCALINGS = ("none", "linear", "llama3")  # models/rope.py


@dataclass
class RopeScaling:
    """RoPE frequency scaling for long context (models/rope.py), `model.rope_scaling.*`.

    `type`: "none"; "linear" (every frequency divided by `factor`, position interpolation);
    "llama3" (Llama 3.1's rule: wavelengths longer than original_max_position_embeddings /
    low_freq_factor divided by `factor`, shorter than original_max_position_embeddings /
    high_freq_factor kept, the band between blended smoothly). The other fields default to
    Llama 3.1's values; `low_freq_factor` and the rest are read by llama3 only.
    """

    type: str = "none"  # none, linear or llama3
    factor: float = 8.0  # how much longer a context than the original
    low_freq_factor: float = 1.0  # llama3: wavelengths beyond original / this are scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original / this are kept
    original_max_position_embeddings: int = 8192  # the context the model was trained at

    def check(self, prefix: str = "model.rope_scaling") -> None:
        if self.type not in ROPE_SCALINGS:
            raise ConfigError(
                f"{prefix}.type={self.type!r} is unknown; use one of {ROPE_SCALINGS}"
            )
        if self.type == "none":
            return
        if self.factor <= 0:
            raise ConfigError(f"{prefix}.factor={self.factor} must be positive")
        if self.type == "llama3" and not (
            0 < self.low_freq_factor < self.high_freq_factor
            and self.original_max_position_embeddings > 0
        ):
            raise ConfigError(
                f"{prefix}: llama3 scaling needs 0 < low_freq_factor "
                f"({self.low_freq_factor}) < high_freq_factor ({self.high_freq_factor}) and a "
                f"positive original_max_position_embeddings "
                f"({self.original_max_position_embeddings})"
            )


@dataclass
class TransformerConfig:
    """Shape of a decoder-only transformer.

    `family` picks the block: a family registered in models/families.py, e.g. "llama"
    (RMSNorm, RoPE, SwiGLU, grouped-query attention) or "gpt" (LayerNorm, learned
    positions, GELU MLP, tied embeddings, biases); models/<family>/ checks its own options.
    `kernels` picks the code of RMSNorm, RoPE, SwiGLU and the training loss: "torch",
    "fused" (the csrc/ operators) or "auto" (models/kernels.py); the gpt family has none of
    the first three, only the loss.
    `ffn_hidden` of None derives the MLP width: 4*d_model for gpt; for llama 2/3 of
    4*d_model times `ffn_multiplier`, rounded up to a multiple of `ffn_multiple_of` (Llama's rule).
    `attention` picks the kernel: "sdpa", "flash" or "flex" (models/attention/).
    `moe` makes layers Mixture-of-Experts (models/moe.py; num_experts 0: dense).
    `rope_per_document` restarts the RoPE positions at 0 at each document of a packed row
    (llama; the model is then given document ids, data.document_masking=true).
    The llama family's variants (Llama 3.1+, Qwen 2.5 / 3, Mistral): `rope_scaling`
    (RopeScaling), `qkv_bias` (biases on the q, k, v projections, Qwen 2.5), `qk_norm`
    (RMSNorm over each head of q and k before RoPE, Qwen 3), `head_dim` (the width of a head
    when it is not d_model / n_heads; None derives it), `sliding_window` (each token attends
    to itself and the window - 1 tokens before it, Mistral; None: the whole causal prefix).
    `mup.base_width` makes the model a muP model (models/mup.py; null: standard
    parametrization).
    """

    name: str = "custom"  # the preset's name, for logs
    family: str = "llama"  # a registered family: llama, gpt, ... (see above)
    n_layers: int = 2  # transformer blocks
    d_model: int = 128  # hidden width
    n_heads: int = 4  # attention (query) heads
    n_kv_heads: int | None = None  # key/value heads (GQA); null: n_heads
    ffn_hidden: int | None = None  # MLP width; null: derived (see above)
    ffn_multiplier: float = 1.0
    ffn_multiple_of: int = 256
    # Embedding rows, at least the data's vocabulary; null (the small CPU presets): the
    # tokenizer's size rounded up to a multiple of 128, stated at start.
    vocab_size: int | None = 4096
    max_seq_len: int = 256  # longest sequence (RoPE tables, gpt positions)
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # epsilon of RMSNorm/LayerNorm
    tie_embeddings: bool = False  # the LM head shares the embedding matrix
    init_std: float = 0.02  # standard deviation of the initial weights
    attention: str = "sdpa"
    rope_per_document: bool = False
    kernels: str = "auto"
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # llama3 / linear
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen 2.5)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen 3)
    head_dim: int | None = None  # a head's width; null: d_model / n_heads
    sliding_window: int | None = None  # attend to the last this-many tokens; null: all
    moe: MoEConfig = field(default_factory=MoEConfig)  # Mixture-of-Experts layers
    mla: LatentAttentionConfig = field(default_factory=LatentAttentionConfig)  # deepseek_v3
    mup: MupConfig = field(default_factory=MupConfig)  # muP (models/mup.py); null: SP
    # Low-rank adapters on the frozen model (models/lora.py); rank 0: every weight trains.
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    @property
    def head_size(self) -> int:
        """The width of one attention head: `head_dim`, or d_model / n_heads when unset."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def vocab_rows(self) -> int:
        """`vocab_size` once resolved from the data (core.config.to_config does it); a
        ConfigError while it is still null."""
        if self.vocab_size is None:
            raise ConfigError(
                "model.vocab_size=null takes the data's vocabulary, which could not be read "
                "(see the data's error); set model.vocab_size"
            )
        return self.vocab_size

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def mlp_hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return family_spec(self.family).mlp_hidden(self)

    def check(self, prefix: str = "model") -> None:
        """Raise ConfigError naming the first inconsistent field (`prefix.field`)."""
        if self.kernels not in KERNELS:
            raise ConfigError(
                f"{prefix}.kernels={self.kernels!r} is unknown; use one of {KERNELS}"
            )
        spec = family_spec(self.family, f"{prefix}.family")
        for setting in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len"):
            value = getattr(self, setting)  # vocab_size null: the data's, resolved later
            if value is not None and value <= 0:
                raise ConfigError(f"{prefix}.{setting}={value} must be positive")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"{prefix}.n_heads={self.n_heads} does not divide {prefix}.d_model={self.d_model}; "
                f"set {prefix}.n_heads={self._nearest_head_count()}"
            )
        if self.head_size <= 0:
            raise ConfigError(f"{prefix}.head_dim={self.head_size} (a head's width) must be "
                              "positive")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(
                f"{prefix}.sliding_window={self.sliding_window} must be positive, or null "
                "for full causal attention"
            )
        self.rope_scaling.check(f"{prefix}.rope_scaling")
        self.lora.check(f"{prefix}.lora")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            divisor = max(d for d in range(1, max(1, min(self.kv_heads, self.n_heads)) + 1)
                          if self.n_heads % d == 0)
            raise ConfigError(
                f"{prefix}.n_kv_heads={self.n_kv_heads} must divide {prefix}.n_heads="
                f"{self.n_heads}; set {prefix}.n_kv_heads={divisor}"
            )
        check_choice(f"{prefix}.attention", self.attention, ATTENTION_BACKENDS)
        if self.rope_per_document and spec.rope_dim(self) is None:
            raise ConfigError(
                f"{prefix}.rope_per_document=true: the {self.family} family has learned "
                "positions, not RoPE; leave it false"
            )
        if self.moe.enabled and not spec.moe:
            raise ConfigError(
                f"{prefix}.moe.num_experts={self.moe.num_experts}: the {self.family} family "
                f"has no Mixture-of-Experts blocks; set {prefix}.moe.num_experts=0 or use a "
                "family that has them (llama)"
            )
        self.moe.check(f"{prefix}.moe", self.n_layers)
        check_mup(self, prefix)
        spec.check(self, prefix)


    def _nearest_head_count(self) -> int:
        """The head count nearest `n_heads` (the larger on a tie) that divides `d_model` and
        that `n_kv_heads`, when set, divides."""
        kv = self.n_kv_heads or 1
        counts = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and h % kv == 0]
        return min(counts or [1], key=lambda h: (abs(h - self.n_heads), -h))


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
    if isinstance(settings.get("rope_scaling"), Mapping):
        settings["rope_scaling"] = RopeScaling(**settings["rope_scaling"])
    known = {f.name for f in fields(TransformerConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]} is not a model setting; the settings are "
            f"{', '.join(sorted(known))}"
        )
    if isinstance(settings.get("moe"), Mapping):
        settings["moe"] = as_moe_config(settings["moe"])
    for section in fields(TransformerConfig):  # a family's own settings section
        value = settings.get(section.name)
        if isinstance(value, Mapping) and callable(section.default_factory):
            settings[section.name] = _as_section(section.default_factory(), value,
                                                 f"model.{section.name}")
    return TransformerConfig(**settings)


def _as_section(default: Any, settings: Mapping[str, Any], prefix: str) -> Any:
    """The settings dataclass of `default`'s type from a plain dict; unknown keys raise
    ConfigError."""
    known = {f.name for f in fields(default)}
    unknown = sorted(set(map(str, settings)) - known)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]} is not a setting; the settings are "
                          f"{', '.join(sorted(known))}")
    return type(default)(**{str(key): value for key, value in settings.items()})


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
