"""The llama family's Hugging Face adapter: Llama, Mistral, Qwen2, Qwen3 and Mixtral.

Tensor names map one to one (ours `layers.<i>.attention.wq.weight`, theirs
`model.layers.<i>.self_attn.q_proj.weight`). RoPE: models/rope.py rotates halves (channel i
with i + head_dim/2), as Hugging Face Llama does, so q/k rows copy without permutation
(Meta's original checkpoints interleave pairs and need one; their Hugging Face conversions
already applied it). Mixtral's experts convert in models/llama/hf_mixtral.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from scaleforge.models.config import TransformerConfig
from scaleforge.models.hf_adapter import HFAdapter, StateDict, inverse, rename
from scaleforge.models.llama.hf_config import ARCHITECTURES, from_llama_config, to_llama_config
from scaleforge.models.llama.hf_mixtral import (
    DENSE_MLP_KEYS,
    from_mixtral_experts,
    fused_expert_layout,
    to_mixtral_experts,
)

# Per-layer names, ours -> Hugging Face, below `layers.<i>.` / `model.layers.<i>.`; the four
# llama-family architectures share them. A model has the biases (Qwen2) and the q/k norms
# (Qwen3) only when its config says so; names it lacks are skipped.
LLAMA_LAYER_KEYS = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
LLAMA_GLOBAL_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def llama_layer_keys(cfg: TransformerConfig) -> dict[str, str]:
    """The Llama per-layer table; a Mixtral layer has experts (models/llama/hf_mixtral.py)
    instead of the dense MLP."""
    dense = not cfg.moe.enabled
    return {k: v for k, v in LLAMA_LAYER_KEYS.items() if dense or k not in DENSE_MLP_KEYS}


def to_llama_state_dict(state: Mapping[str, torch.Tensor], cfg: TransformerConfig) -> StateDict:
    """Ours -> Hugging Face's, tensors shared."""
    return rename(state, cfg.n_layers, LLAMA_GLOBAL_KEYS, llama_layer_keys(cfg),
                  "layers.{}.", "model.layers.{}.") | to_mixtral_experts(state, cfg)


def from_llama_state_dict(state: Mapping[str, torch.Tensor], cfg: TransformerConfig
                          ) -> StateDict:
    """Hugging Face's -> ours, tensors shared."""
    return rename(state, cfg.n_layers, inverse(LLAMA_GLOBAL_KEYS),
                  inverse(llama_layer_keys(cfg)), "model.layers.{}.",
                  "layers.{}.") | from_mixtral_experts(state, cfg)


HF_ADAPTER = HFAdapter(
    model_types=(*ARCHITECTURES, "mixtral"),
    from_config=from_llama_config,
    to_config=to_llama_config,
    to_state_dict=to_llama_state_dict,
    from_state_dict=from_llama_state_dict,
    global_keys=LLAMA_GLOBAL_KEYS,
    published_layout=fused_expert_layout,
)
