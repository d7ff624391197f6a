"""The deepseek_v3 family's Hugging Face adapter: DeepseekV3Config / DeepseekV3ForCausalLM.

    ours (layers.<i>.)                     Hugging Face (model.layers.<i>.)
    attention.wq / wq_a, q_norm, wq_b      self_attn.q_proj / q_a_proj, q_a_layernorm, q_b_proj
    attention.wkv_a; attention.wk_rope     self_attn.kv_a_proj_with_mqa: [wkv_a; wk_rope] rows
    attention.kv_norm, wkv_b, wo           self_attn.kv_a_layernorm, kv_b_proj, o_proj
    feed_forward.w1, w3, w2 (dense)        mlp.gate_proj, up_proj, down_proj
    feed_forward.router.weight             mlp.gate.weight
    feed_forward.expert_bias               mlp.gate.e_score_correction_bias
    feed_forward.experts.w1, w3; w2        mlp.experts.gate_up_proj [w1; w3]; down_proj
    feed_forward.shared.w1, w3, w2         mlp.shared_experts.gate_proj, up_proj, down_proj

RoPE: we rotate halves, as `rope_interleave=False` does; DeepSeek's published checkpoints
rotate interleaved pairs (`rope_interleave=True`) and are refused, as are their routing
settings: ours is DeepSeek-V3's without groups and without the routed scaling factor, so a
config with `n_group` limiting the choice (topk_group < n_group) or a
`routed_scaling_factor` other than 1 is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import DeepseekV3Config, PretrainedConfig

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.deepseek_v3.config import LatentAttentionConfig
from scaleforge.models.hf_adapter import (
    HFAdapter,
    Refusal,
    StateDict,
    check_refusals,
    inverse,
    refuse,
    rename,
    shared_settings,
    unchanged,
)
from scaleforge.models.llama.hf_config import LLAMA_ACTIVATIONS, rope_parameters, rope_settings
from scaleforge.models.moe import MoEConfig, expert_hidden

LAYER_KEYS = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq_a.weight": "self_attn.q_a_proj.weight",
    "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.wq_b.weight": "self_attn.q_b_proj.weight",
    "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.router.weight": "mlp.gate.weight",
    "feed_forward.expert_bias": "mlp.gate.e_score_correction_bias",
    "feed_forward.experts.w2": "mlp.experts.down_proj",
    "feed_forward.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "feed_forward.shared.w3.weight": "mlp.shared_experts.up_proj.weight",
    "feed_forward.shared.w2.weight": "mlp.shared_experts.down_proj.weight",
}
GLOBAL_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
REFUSALS: tuple[Refusal, ...] = (
    ("hidden_act", "silu", lambda act: act in LLAMA_ACTIVATIONS,
     "ScaleForge's MLPs and experts are SwiGLU (silu)"),
    ("attention_bias", False, lambda bias: not bias,
     "ScaleForge's latent attention has no biases"),
    ("rope_interleave", True, lambda interleave: not interleave,
     "ScaleForge's RoPE rotates halves (rope_interleave=false), not interleaved pairs"),
    ("routed_scaling_factor", 1.0, lambda factor: factor == 1.0,
     "ScaleForge's router does not rescale the routed experts' weights; set it to 1.0"),
)


def to_deepseek_v3_config(cfg: TransformerConfig) -> PretrainedConfig:
    """DeepseekV3Config of `cfg`: group-free routing, scaling factor 1, halves-RoPE."""
    moe, mla = cfg.moe, cfg.mla
    unsupported = {"every_n_layers": (moe.every_n_layers, 1),
                   "score_func": (moe.score_func, "sigmoid"),
                   "capacity_factor": (moe.capacity_factor, None)}
    for setting, (value, theirs) in unsupported.items():
        if moe.enabled and value != theirs:
            raise ConfigError(
                f"model.moe.{setting}={value!r}: sf-convert writes DeepseekV3ForCausalLM with "
                f"{setting}={theirs!r}; a model with it cannot be exported to Hugging Face"
            )
    if moe.enabled and not moe.shared_experts:
        raise ConfigError("model.moe.shared_experts=0: DeepseekV3ForCausalLM's MoE layers "
                          "always have shared experts; set it to 1 or more to export")
    settings: dict[str, Any] = shared_settings(cfg)
    return DeepseekV3Config(
        hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
        moe_intermediate_size=expert_hidden(cfg), num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        n_shared_experts=moe.shared_experts, n_routed_experts=moe.num_experts or 1,
        routed_scaling_factor=1.0, n_group=1, topk_group=1,
        num_experts_per_tok=moe.top_k if moe.enabled else 1,
        first_k_dense_replace=moe.first_dense_layers if moe.enabled else cfg.n_layers,
        norm_topk_prob=moe.normalize_weights, hidden_act="silu",
        q_lora_rank=mla.q_lora_rank or None, kv_lora_rank=mla.kv_lora_rank,
        qk_rope_head_dim=mla.qk_rope_head_dim, qk_nope_head_dim=mla.qk_nope_head_dim,
        v_head_dim=mla.v_head_dim, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_parameters=rope_parameters(cfg),
        rope_interleave=False, attention_bias=False, attention_dropout=0.0, **settings,
    )


def from_deepseek_v3_config(hf_config: PretrainedConfig, name: str) -> TransformerConfig:
    """Our config of a DeepseekV3Config, refusing what our block does not compute."""
    check_refusals(hf_config, REFUSALS)
    groups, chosen = hf_config.n_group or 1, hf_config.topk_group or 1
    if chosen < groups:
        refuse("topk_group", chosen, f"routing limited to {chosen} of n_group={groups} groups; "
               "ScaleForge's router chooses among all experts (set topk_group = n_group)")
    rope_theta, rope_scaling = rope_settings(hf_config)
    dense = hf_config.first_k_dense_replace >= hf_config.num_hidden_layers
    moe = MoEConfig() if dense else MoEConfig(
        num_experts=hf_config.n_routed_experts, top_k=hf_config.num_experts_per_tok,
        shared_experts=hf_config.n_shared_experts,
        expert_hidden=hf_config.moe_intermediate_size,
        first_dense_layers=hf_config.first_k_dense_replace, score_func="sigmoid",
        normalize_weights=bool(hf_config.norm_topk_prob))
    return TransformerConfig(
        name=name, family="deepseek_v3", n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size, n_heads=hf_config.num_attention_heads,
        ffn_hidden=hf_config.intermediate_size, vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.max_position_embeddings, rope_theta=rope_theta,
        norm_eps=hf_config.rms_norm_eps, tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range, rope_scaling=rope_scaling, moe=moe,
        mla=LatentAttentionConfig(
            q_lora_rank=hf_config.q_lora_rank or 0, kv_lora_rank=hf_config.kv_lora_rank,
            qk_nope_head_dim=hf_config.qk_nope_head_dim,
            qk_rope_head_dim=hf_config.qk_rope_head_dim, v_head_dim=hf_config.v_head_dim),
    )


def to_deepseek_v3_state_dict(state: Mapping[str, torch.Tensor], cfg: TransformerConfig
                              ) -> StateDict:
    """Ours -> Hugging Face's: the latent and RoPE key projections stacked, w1 and w3 of
    the experts stacked."""
    hf = rename(state, cfg.n_layers, GLOBAL_KEYS, LAYER_KEYS, "layers.{}.", "model.layers.{}.")
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        hf[theirs + "self_attn.kv_a_proj_with_mqa.weight"] = torch.cat(
            [state[ours + "attention.wkv_a.weight"], state[ours + "attention.wk_rope.weight"]])
        if ours + "feed_forward.experts.w1" in state:
            hf[theirs + "mlp.experts.gate_up_proj"] = torch.cat(
                [state[ours + "feed_forward.experts.w1"],
                 state[ours + "feed_forward.experts.w3"]], dim=1)
    return hf


def from_deepseek_v3_state_dict(state: Mapping[str, torch.Tensor], cfg: TransformerConfig
                                ) -> StateDict:
    """Hugging Face's -> ours: the stacked projections split."""
    ours = rename(state, cfg.n_layers, inverse(GLOBAL_KEYS), inverse(LAYER_KEYS),
                  "model.layers.{}.", "layers.{}.")
    for i in range(cfg.n_layers):
        mine, theirs = f"layers.{i}.", f"model.layers.{i}."
        latent, rope = state[theirs + "self_attn.kv_a_proj_with_mqa.weight"].split(
            [cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim])
        ours[mine + "attention.wkv_a.weight"], ours[mine + "attention.wk_rope.weight"] = (
            latent, rope)
        if theirs + "mlp.experts.gate_up_proj" in state:
            w1, w3 = state[theirs + "mlp.experts.gate_up_proj"].chunk(2, dim=1)
            ours[mine + "feed_forward.experts.w1"] = w1
            ours[mine + "feed_forward.experts.w3"] = w3
    return ours


HF_ADAPTER = HFAdapter(
    model_types=("deepseek_v3",),
    from_config=from_deepseek_v3_config,
    to_config=to_deepseek_v3_config,
    to_state_dict=to_deepseek_v3_state_dict,
    from_state_dict=from_deepseek_v3_state_dict,
    global_keys=GLOBAL_KEYS,
    published_layout=unchanged,
)
