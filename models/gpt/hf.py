"""The gpt family's Hugging Face adapter: GPT2Config and GPT2LMHeadModel.

Layouts that need care: Hugging Face's Conv1D stores weights as (in, out), the transpose of
nn.Linear; and `c_attn` fuses the q, k and v projections along its output dimension.
Published GPT-2 files may lack the `transformer.` prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import GPT2Config, PretrainedConfig

from scaleforge.models.config import TransformerConfig
from scaleforge.models.hf_adapter import (
    HFAdapter,
    Refusal,
    StateDict,
    check_refusals,
    inverse,
    rename,
    shared_settings,
)

# Both compute GELU's tanh approximation, as models/transformer.GeluMLP does.
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
GPT2_REFUSALS: tuple[Refusal, ...] = (
    ("activation_function", "gelu_new", lambda act: act in GPT2_ACTIVATIONS,
     f"ScaleForge's gpt MLP uses GELU's tanh approximation; use one of {GPT2_ACTIVATIONS}"),
    ("scale_attn_weights", True, bool, "ScaleForge scales attention by 1/sqrt(head_dim)"),
    ("scale_attn_by_inverse_layer_idx", False, lambda scaled: not scaled,
     "ScaleForge scales every layer's attention alike"),
    ("add_cross_attention", False, lambda cross: not cross,
     "ScaleForge's models are decoder-only"),
)
# GPT-2 names that map one to one; the Conv1D ones (`CONV1D`) are transposed on the way.
GPT2_LAYER_KEYS = {
    "attention_norm.weight": "ln_1.weight",
    "attention_norm.bias": "ln_1.bias",
    "attention.wo.weight": "attn.c_proj.weight",
    "attention.wo.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight",
    "ffn_norm.bias": "ln_2.bias",
    "feed_forward.w1.weight": "mlp.c_fc.weight",
    "feed_forward.w1.bias": "mlp.c_fc.bias",
    "feed_forward.w2.weight": "mlp.c_proj.weight",
    "feed_forward.w2.bias": "mlp.c_proj.bias",
}
GPT2_GLOBAL_KEYS = {
    "tok_embeddings.weight": "transformer.wte.weight",
    "pos_embeddings.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
LINEAR_AS_CONV1D = ("attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight")
CONV1D = tuple(GPT2_LAYER_KEYS[name] for name in LINEAR_AS_CONV1D)


def to_gpt2_config(cfg: TransformerConfig) -> PretrainedConfig:
    """GPT2Config of `cfg`, dropouts 0."""
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
        **shared_settings(cfg),
    )


def from_gpt2_config(hf_config: PretrainedConfig, name: str) -> TransformerConfig:
    """Our config of a GPT2Config, refusing what our gpt block does not compute."""
    check_refusals(hf_config, GPT2_REFUSALS)
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


def to_gpt2_state_dict(state: Mapping[str, torch.Tensor], cfg: TransformerConfig) -> StateDict:
    """Ours -> GPT-2's: q, k, v fused into c_attn, Linear weights transposed to Conv1D."""
    hf = rename(state, cfg.n_layers, GPT2_GLOBAL_KEYS, GPT2_LAYER_KEYS, "layers.{}.",
                "transformer.h.{}.")
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.attention.", f"transformer.h.{i}.attn.c_attn."
        # Linear (out, in) -> Conv1D (in, out); q, k, v side by side along `out`.
        hf[theirs + "weight"] = torch.cat([state[ours + f"w{p}.weight"] for p in "qkv"], 0).t()
        hf[theirs + "bias"] = torch.cat([state[ours + f"w{p}.bias"] for p in "qkv"], 0)
        for suffix in CONV1D:
            hf[f"transformer.h.{i}.{suffix}"] = hf[f"transformer.h.{i}.{suffix}"].t()
    return hf


def from_gpt2_state_dict(state: Mapping[str, torch.Tensor], cfg: TransformerConfig
                         ) -> StateDict:
    """GPT-2's -> ours: c_attn split into q, k, v, Conv1D weights transposed to Linear."""
    ours = rename(state, cfg.n_layers, inverse(GPT2_GLOBAL_KEYS), inverse(GPT2_LAYER_KEYS),
                  "transformer.h.{}.", "layers.{}.")
    for i in range(cfg.n_layers):
        theirs, mine = f"transformer.h.{i}.attn.c_attn.", f"layers.{i}.attention."
        weights = state[theirs + "weight"].t().chunk(3, dim=0)  # 3 x (d, d), (out, in)
        biases = state[theirs + "bias"].chunk(3, dim=0)
        for p, weight, bias in zip("qkv", weights, biases, strict=True):
            ours[mine + f"w{p}.weight"], ours[mine + f"w{p}.bias"] = weight, bias
        for suffix in LINEAR_AS_CONV1D:
            ours[f"layers.{i}.{suffix}"] = ours[f"layers.{i}.{suffix}"].t()
    return ours


def with_transformer_prefix(state: Mapping[str, torch.Tensor], cfg: TransformerConfig
                            ) -> StateDict:
    """Published GPT-2 files name the body without the `transformer.` prefix."""
    return {name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}": t
            for name, t in state.items()}


HF_ADAPTER = HFAdapter(
    model_types=("gpt2",),
    from_config=from_gpt2_config,
    to_config=to_gpt2_config,
    to_state_dict=to_gpt2_state_dict,
    from_state_dict=from_gpt2_state_dict,
    global_keys=GPT2_GLOBAL_KEYS,
    published_layout=with_transformer_prefix,
)
