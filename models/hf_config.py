"""Configuration conversion between ScaleForge and Hugging Face `transformers`.

    llama <-> LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config (`ARCHITECTURES`)
    gpt   <-> GPT2Config
    llama with model.moe <-> MixtralConfig (models/hf_mixtral.py)

The four llama-family architectures differ only in what their class fixes (Qwen 2's q/k/v
biases, Qwen 3's q/k norms) and in how their config spells a sliding window; the table
`ARCHITECTURES` says which, so one reader and one writer serve all four. Going to Hugging
Face, the first architecture of the table that represents the model is chosen.
A setting one side cannot represent (yarn RoPE, biases on o_proj, a non-SwiGLU MLP, sliding
windows on some layers only, ...) raises ConfigError naming it. The weights are converted by
models/hf.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from transformers import (
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from scaleforge.errors import ConfigError
from scaleforge.models.config import RopeScaling, TransformerConfig
from scaleforge.models.hf_mixtral import mixtral_moe_config, to_mixtral_config

# Both compute GELU's tanh approximation, as models/transformer.GeluMLP does.
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
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


class _SharedHFSettings(TypedDict):
    """The Hugging Face config settings both families take alike."""

    vocab_size: int
    tie_word_embeddings: bool
    initializer_range: float
    bos_token_id: None
    eos_token_id: None


def to_hf_config(cfg: TransformerConfig) -> PretrainedConfig:
    """The Hugging Face config of `cfg`: the first of `ARCHITECTURES` that represents a llama
    model (Llama, then Mistral, Qwen2, Qwen3), MixtralConfig (llama with experts) or
    GPT2Config (gpt).

    Dropouts are 0 (our models have none); bos/eos token ids are left unset because the
    tokenizer is not part of the model config.
    """
    cfg.check("model")
    if cfg.moe.enabled:
        return to_mixtral_config(cfg)
    common = _SharedHFSettings(
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=None,
        eos_token_id=None,
    )
    if cfg.family == "llama":
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
            rope_parameters=_rope_parameters(cfg),
            hidden_act="silu",
            **_window_settings(architecture, cfg.sliding_window),
            **architecture.fixed,
            **common,
        )
    return GPT2Config(
        n_embd=cfg.d_model,
        n_inner=cfg.mlp_hidden,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_positions=cfg.max_seq_len,
        layer_norm_epsilon=cfg.norm_eps,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **common,
    )


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


def _rope_parameters(cfg: TransformerConfig) -> dict[str, Any]:
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


def from_hf_config(hf_config: PretrainedConfig, name: str | None = None) -> TransformerConfig:
    """Our TransformerConfig for a Hugging Face Llama, Mistral, Qwen2, Qwen3 or GPT-2 config.

    Raises ConfigError naming the first Hugging Face setting our models cannot represent
    (e.g. `hidden_act`, `rope_parameters.rope_type`, `attention_bias`, `layer_types`).
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type in ARCHITECTURES:
        cfg = _decoder_config(hf_config, ARCHITECTURES[model_type], name or f"hf_{model_type}")
    elif model_type == "mixtral":  # Mistral's attention with Mixtral's experts
        cfg = _decoder_config(hf_config, ARCHITECTURES["mistral"], name or "hf_mixtral")
        cfg.moe = mixtral_moe_config(hf_config)
    elif model_type == "gpt2":
        cfg = _gpt2_config(hf_config, name or "hf_gpt2")
    else:
        raise ConfigError(
            f"Hugging Face model_type={model_type!r} is not supported; sf-convert converts "
            f"{', '.join(map(repr, [*ARCHITECTURES, 'mixtral', 'gpt2']))} (LlamaForCausalLM, "
            "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM, "
            "GPT2LMHeadModel)"
        )
    cfg.check("model")
    return cfg


def _refuse(setting: str, value: object, reason: str) -> None:
    raise ConfigError(f"Hugging Face config {setting}={value!r}: {reason}")


# (setting, default when the config lacks it, accepted, why a refused value cannot map).
Refusal = tuple[str, object, Callable[[Any], bool], str]

DECODER_REFUSALS: tuple[Refusal, ...] = (
    ("hidden_act", "silu", lambda act: act in LLAMA_ACTIVATIONS,
     "ScaleForge's llama MLP is SwiGLU (silu)"),
    ("attention_bias", False, lambda bias: not bias,
     "biases on all four attention projections (o_proj too); ScaleForge has q/k/v biases "
     "only (Qwen2's layout)"),
    ("mlp_bias", False, lambda bias: not bias, "ScaleForge's SwiGLU has no biases"),
)
GPT2_REFUSALS: tuple[Refusal, ...] = (
    ("activation_function", "gelu_new", lambda act: act in GPT2_ACTIVATIONS,
     f"ScaleForge's gpt MLP uses GELU's tanh approximation; use one of {GPT2_ACTIVATIONS}"),
    ("scale_attn_weights", True, bool, "ScaleForge scales attention by 1/sqrt(head_dim)"),
    ("scale_attn_by_inverse_layer_idx", False, lambda scaled: not scaled,
     "ScaleForge scales every layer's attention alike"),
    ("add_cross_attention", False, lambda cross: not cross,
     "ScaleForge's models are decoder-only"),
)


def _check_refusals(hf_config: PretrainedConfig, refusals: tuple[Refusal, ...]) -> None:
    for setting, default, accepted, reason in refusals:
        value = getattr(hf_config, setting, default)
        if not accepted(value):
            _refuse(setting, value, reason)


def _rope(hf_config: PretrainedConfig) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling); transformers 5 keeps both in `rope_parameters`, 4.x in
    `rope_theta` and `rope_scaling`. Refuses the scalings models/rope.py does not compute."""
    parameters = getattr(hf_config, "rope_parameters", None) or {
        **(getattr(hf_config, "rope_scaling", None) or {}),
        "rope_theta": hf_config.rope_theta,
    }
    hf_type = parameters.get("rope_type", parameters.get("type", "default"))
    if hf_type not in ROPE_TYPES:
        _refuse("rope_parameters.rope_type", hf_type,
                f"ScaleForge's RoPE scales frequencies by {', '.join(ROPE_TYPES)} only")
    ours = ROPE_TYPES[hf_type]
    fields = {name: parameters[name] for name in ROPE_FIELDS[ours]}
    if parameters.get("attention_factor") not in (None, 1.0):
        _refuse("rope_parameters.attention_factor", parameters["attention_factor"],
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
    _refuse("layer_types", layer_types, "ScaleForge gives every layer the same attention "
            "(all full_attention or all sliding_attention; see max_window_layers)")
    return None  # unreachable: _refuse raises


def _decoder_config(
    hf_config: PretrainedConfig, architecture: Architecture, name: str
) -> TransformerConfig:
    _check_refusals(hf_config, DECODER_REFUSALS)
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim == hf_config.hidden_size // heads:
        head_dim = None  # derived: d_model / n_heads
    rope_theta, rope_scaling = _rope(hf_config)
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


def _gpt2_config(hf_config: PretrainedConfig, name: str) -> TransformerConfig:
    _check_refusals(hf_config, GPT2_REFUSALS)
    return TransformerConfig(
        name=name,
        family="gpt",
        n_layers=hf_config.n_layer,
        d_model=hf_config.n_embd,
        n_heads=hf_config.n_head,
        ffn_hidden=hf_config.n_inner,
        vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.n_positions,
        norm_eps=hf_config.layer_norm_epsilon,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range,
    )
