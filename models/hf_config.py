"""Configuration conversion between ScaleForge and Hugging Face `transformers`.

Each family's adapter (models/hf_adapter.py, in models/<family>/) converts its own configs:
llama <-> LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, MixtralConfig (with
model.moe); gpt <-> GPT2Config. Reading, the family is the one whose adapter reads the
config's `model_type`. A setting one side cannot represent (yarn RoPE, biases on o_proj, a
non-SwiGLU MLP, sliding windows on some layers only, muP's multipliers, ...) raises
ConfigError naming it. The weights are converted by models/hf.py.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.hf_adapter import adapter_for_model_type, hf_adapter
from scaleforge.models.mup import width_multiplier


def to_hf_config(cfg: TransformerConfig) -> PretrainedConfig:
    """The Hugging Face config of `cfg` (its family's adapter picks the architecture).

    Dropouts are 0 (our models have none); bos/eos token ids are left unset because the
    tokenizer is not part of the model config.
    """
    cfg.check("model")
    if cfg.mup.enabled:
        raise ConfigError(
            f"model.mup.base_width={cfg.mup.base_width}: a muP model's readout multiplier "
            f"(1/{width_multiplier(cfg):g}) and attention scale have no Hugging "
            "Face config field, so its logits would differ there; export a model trained "
            "with model.mup.base_width=null"
        )
    return hf_adapter(cfg).to_config(cfg)


def from_hf_config(hf_config: PretrainedConfig, name: str | None = None) -> TransformerConfig:
    """Our TransformerConfig for a Hugging Face config of a model_type some family reads.

    Raises ConfigError naming the first Hugging Face setting our models cannot represent
    (e.g. `hidden_act`, `rope_parameters.rope_type`, `attention_bias`, `layer_types`).
    """
    model_type = getattr(hf_config, "model_type", None)
    adapter = adapter_for_model_type(model_type)
    cfg = adapter.from_config(hf_config, name or f"hf_{model_type}")
    cfg.check("model")
    return cfg
