"""Configuration conversion between ScaleForge and Hugging Face `transformers`.

    llama <-> LlamaConfig      gpt <-> GPT2Config
    llama with model.moe <-> MixtralConfig (models/hf_mixtral.py)

A setting one side cannot represent (scaled RoPE, biases on a Llama, a non-SwiGLU MLP, ...)
raises ConfigError naming it. The weights are converted by models/hf.py.
"""

from __future__ import annotations

from typing import TypedDict

from transformers import GPT2Config, LlamaConfig, MixtralConfig, PretrainedConfig

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.hf_mixtral import mixtral_moe_config, to_mixtral_config

# Both compute GELU's tanh approximation, as models/transformer.GeluMLP does.
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
LLAMA_ACTIVATIONS = ("silu", "swish")  # two names of x * sigmoid(x)


class _SharedHFSettings(TypedDict):
    """The Hugging Face config settings both families take alike."""

    vocab_size: int
    tie_word_embeddings: bool
    initializer_range: float
    bos_token_id: None
    eos_token_id: None


def to_hf_config(cfg: TransformerConfig) -> LlamaConfig | MixtralConfig | GPT2Config:
    """The Hugging Face config of `cfg`: LlamaConfig (llama), MixtralConfig (llama with
    experts) or GPT2Config (gpt).

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
        # transformers 5 takes rope_theta through **kwargs (into rope_parameters), which its
        # dataclass signature does not show; 4.x has it as a field.
        return LlamaConfig(  # type: ignore[call-arg]
            hidden_size=cfg.d_model,
            intermediate_size=cfg.mlp_hidden,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
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


def from_hf_config(hf_config: PretrainedConfig, name: str | None = None) -> TransformerConfig:
    """Our TransformerConfig for a Hugging Face Llama or GPT-2 config.

    Raises ConfigError naming the first Hugging Face setting our models cannot represent
    (e.g. `hidden_act`, `rope_scaling`, `attention_bias`, `activation_function`).
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "llama":
        cfg = _llama_config(hf_config, name or "hf_llama")
    elif model_type == "mixtral":
        cfg = _llama_config(hf_config, name or "hf_mixtral")
        cfg.moe = mixtral_moe_config(hf_config)
    elif model_type == "gpt2":
        cfg = _gpt2_config(hf_config, name or "hf_gpt2")
    else:
        raise ConfigError(
            f"Hugging Face model_type={model_type!r} is not supported; sf-convert converts "
            "'llama' (LlamaForCausalLM), 'mixtral' (MixtralForCausalLM) and 'gpt2' "
            "(GPT2LMHeadModel)"
        )
    cfg.check("model")
    return cfg


def _refuse(setting: str, value: object, reason: str) -> None:
    raise ConfigError(f"Hugging Face config {setting}={value!r}: {reason}")


def _llama_rope_theta(hf_config: PretrainedConfig) -> float:
    """rope_theta, refusing scaled RoPE; transformers 5 keeps both in `rope_parameters`,
    4.x in `rope_theta` and `rope_scaling`."""
    parameters = getattr(hf_config, "rope_parameters", None)
    if parameters is not None:
        rope_type = parameters.get("rope_type", "default")
        if rope_type != "default":
            _refuse(
                "rope_parameters.rope_type",
                rope_type,
                "ScaleForge's RoPE has no frequency scaling (llama3, yarn, linear, ...)",
            )
        return float(parameters["rope_theta"])
    if getattr(hf_config, "rope_scaling", None):
        _refuse(
            "rope_scaling",
            hf_config.rope_scaling,
            "ScaleForge's RoPE has no frequency scaling (llama3, yarn, linear, ...)",
        )
    return float(hf_config.rope_theta)


def _llama_config(hf_config: PretrainedConfig, name: str) -> TransformerConfig:
    if hf_config.hidden_act not in LLAMA_ACTIVATIONS:
        _refuse("hidden_act", hf_config.hidden_act, "ScaleForge's llama MLP is SwiGLU (silu)")
    for setting in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, setting, False):
            _refuse(setting, True, "ScaleForge's llama projections have no biases")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * heads != hf_config.hidden_size:
        _refuse(
            "head_dim",
            head_dim,
            f"ScaleForge needs head_dim = hidden_size / num_attention_heads = "
            f"{hf_config.hidden_size} / {heads}",
        )
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    return TransformerConfig(
        name=name,
        family="llama",
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_heads=heads,
        n_kv_heads=kv_heads,
        ffn_hidden=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=_llama_rope_theta(hf_config),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range,
    )


def _gpt2_config(hf_config: PretrainedConfig, name: str) -> TransformerConfig:
    if hf_config.activation_function not in GPT2_ACTIVATIONS:
        _refuse(
            "activation_function",
            hf_config.activation_function,
            f"ScaleForge's gpt MLP uses GELU's tanh approximation; use one of {GPT2_ACTIVATIONS}",
        )
    if not hf_config.scale_attn_weights:
        _refuse("scale_attn_weights", False, "ScaleForge scales attention by 1/sqrt(head_dim)")
    if hf_config.scale_attn_by_inverse_layer_idx:
        _refuse(
            "scale_attn_by_inverse_layer_idx",
            True,
            "ScaleForge scales every layer's attention alike",
        )
    if getattr(hf_config, "add_cross_attention", False):
        _refuse("add_cross_attention", True, "ScaleForge's models are decoder-only")
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
