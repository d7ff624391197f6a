"""Llama-family configs <-> Hugging Face's LlamaConfig, MistralConfig, Qwen2Config,
Qwen3Config (`ARCHITECTURES`) and, with model.moe, MixtralConfig (models/llama/hf_mixtral.py).

The four llama-family architectures differ only in what their class fixes (Qwen 2's q/k/v
biases, Qwen 3's q/k norms) and in how their config spells a sliding window; the table
`ARCHITECTURES` says which, so one reader and one writer serve all four. Going to Hugging
Face, the first architecture of the table that represents the model is chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from transformers import (
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from scaleforge.errors import ConfigError
from scaleforge.models.config import RopeScaling, TransformerConfig
from scaleforge.models.hf_adapter import Refusal, check_refusals, refuse, shared_settings
from scaleforge.models.llama.hf_mixtral import mixtral_moe_config, to_mixtral_config

LLAMA_ACTIVATIONS = ("silu", "swish")  # two names of x * sigmoid(x)
# Hugging Face rope_type -> ours (models/rope.py); "default" is unscaled.
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
# The RopeScaling fields each scaled rope_type carries in Hugging Face's rope_parameters.
ROPE_FIELDS = {
    "none": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class Architecture:
    """A Hugging Face llama-family decoder: what its class fixes and its config's spelling.

    `qkv_bias`, `qk_norm`: the class always (True) or never (False) has q/k/v biases, per-head
    q/k RMSNorm. `window`: how its config gives a sliding window: "none" (it has none),
    "all_layers" (`sliding_window`, every layer: Mistral) or "layer_types" (`use_sliding_window`
    with `max_window_layers`, read back from `layer_types`: Qwen). `fixed`: settings written
    as given (bias switches that must stay off).
    """

    config_class: Callable[..., PretrainedConfig]  # LlamaConfig, ...: keyword settings
    qkv_bias: bool
    qk_norm: bool
    window: str
    fixed: Mapping[str, Any]


ARCHITECTURES = {
    "llama": Architecture(LlamaConfig, False, False, "none",
                          {"attention_bias": False, "mlp_bias": False}),
    "mistral": Architecture(MistralConfig, False, False, "all_layers", {}),
    "qwen2": Architecture(Qwen2Config, True, False, "layer_types", {}),
    "qwen3": Architecture(Qwen3Config, False, True, "layer_types", {"attention_bias": False}),
}


def to_llama_config(cfg: TransformerConfig) -> PretrainedConfig:
    """The first of `ARCHITECTURES` that represents `cfg` (Llama, then Mistral, Qwen2,
    Qwen3), or MixtralConfig when it has experts."""
    if cfg.moe.enabled:
        return to_mixtral_config(cfg)
    architecture = _architecture_of(cfg)
    return architecture.config_class(
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope_parameters(cfg),
        hidden_act="silu",
        **_window_settings(architecture, cfg.sliding_window),
        **architecture.fixed,
        **shared_settings(cfg),
    )


def from_llama_config(hf_config: PretrainedConfig, name: str) -> TransformerConfig:
    """Our config of a Llama, Mistral, Qwen2, Qwen3 or Mixtral config (Mixtral: Mistral's
    attention with Mixtral's experts)."""
    if hf_config.model_type == "mixtral":
        cfg = _decoder_config(hf_config, ARCHITECTURES["mistral"], name)
        cfg.moe = mixtral_moe_config(hf_config)
        return cfg
    return _decoder_config(hf_config, ARCHITECTURES[hf_config.model_type], name)


def _architecture_of(cfg: TransformerConfig) -> Architecture:
    for architecture in ARCHITECTURES.values():
        if (architecture.qkv_bias == cfg.qkv_bias and architecture.qk_norm == cfg.qk_norm
                and (cfg.sliding_window is None or architecture.window != "none")):
            return architecture
    raise ConfigError(
        f"model.qkv_bias={cfg.qkv_bias}, model.qk_norm={cfg.qk_norm}, "
        f"model.sliding_window={cfg.sliding_window}: no Hugging Face architecture that "
        f"sf-convert writes ({', '.join(ARCHITECTURES)}) has this combination"
    )


def rope_parameters(cfg: TransformerConfig) -> dict[str, Any]:
    scaling = cfg.rope_scaling
    rope_type = {ours: theirs for theirs, ours in ROPE_TYPES.items()}[scaling.type]
    fields = {name: getattr(scaling, name) for name in ROPE_FIELDS[scaling.type]}
    return {"rope_type": rope_type, "rope_theta": cfg.rope_theta, **fields}


def _window_settings(architecture: Architecture, window: int | None) -> dict[str, Any]:
    if architecture.window == "all_layers":
        return {"sliding_window": window}
    if architecture.window == "layer_types":  # max_window_layers=0: every layer slides
        return {"use_sliding_window": window is not None, "sliding_window": window,
                "max_window_layers": 0}
    return {}


DECODER_REFUSALS: tuple[Refusal, ...] = (
    ("hidden_act", "silu", lambda act: act in LLAMA_ACTIVATIONS,
     "ScaleForge's llama MLP is SwiGLU (silu)"),
    ("attention_bias", False, lambda bias: not bias,
     "biases on all four attention projections (o_proj too); ScaleForge has q/k/v biases "
     "only (Qwen2's layout)"),
    ("mlp_bias", False, lambda bias: not bias, "ScaleForge's SwiGLU has no biases"),
)


def rope_settings(hf_config: PretrainedConfig) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling); transformers 5 keeps both in `rope_parameters`, 4.x in
    `rope_theta` and `rope_scaling`. Refuses the scalings models/rope.py does not compute."""
    parameters = getattr(hf_config, "rope_parameters", None) or {
        **(getattr(hf_config, "rope_scaling", None) or {}),
        "rope_theta": hf_config.rope_theta,
    }
    hf_type = parameters.get("rope_type", parameters.get("type", "default"))
    if hf_type not in ROPE_TYPES:
        refuse("rope_parameters.rope_type", hf_type,
                f"ScaleForge's RoPE scales frequencies by {', '.join(ROPE_TYPES)} only")
    ours = ROPE_TYPES[hf_type]
    fields = {name: parameters[name] for name in ROPE_FIELDS[ours]}
    if parameters.get("attention_factor") not in (None, 1.0):
        refuse("rope_parameters.attention_factor", parameters["attention_factor"],
                "ScaleForge does not rescale attention logits")
    return float(parameters["rope_theta"]), RopeScaling(type=ours, **fields)


def _sliding_window(hf_config: PretrainedConfig) -> int | None:
    """One window for every layer, or None; refuses a mix of sliding and full layers."""
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None:
        return getattr(hf_config, "sliding_window", None)
    if set(layer_types) == {"full_attention"}:
        return None
    if set(layer_types) == {"sliding_attention"}:
        return int(hf_config.sliding_window)
    refuse("layer_types", layer_types, "ScaleForge gives every layer the same attention "
            "(all full_attention or all sliding_attention; see max_window_layers)")
    return None  # unreachable: _refuse raises


def _decoder_config(
    hf_config: PretrainedConfig, architecture: Architecture, name: str
) -> TransformerConfig:
    check_refusals(hf_config, DECODER_REFUSALS)
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim == hf_config.hidden_size // heads:
        head_dim = None  # derived: d_model / n_heads
    rope_theta, rope_scaling = rope_settings(hf_config)
    return TransformerConfig(
        name=name,
        family="llama",
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_heads=heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        ffn_hidden=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=rope_theta,
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range,
        rope_scaling=rope_scaling,
        qkv_bias=architecture.qkv_bias,
        qk_norm=architecture.qk_norm,
        head_dim=head_dim,
        sliding_window=_sliding_window(hf_config),
    )


