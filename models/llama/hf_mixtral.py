"""Mixtral (`MixtralForCausalLM`) <-> a ScaleForge llama with `model.moe` (models/moe.py).

Mixtral is a Llama whose every MLP is a softmax top-k Mixture-of-Experts with the routing
weights renormalised over the k chosen, no shared experts and no expert bias. Attention,
norms, embeddings and head convert as for Llama (models/llama/hf.py); this module converts the
config and the expert weights:

    ours (layers.<i>.feed_forward.)       transformers 5 (model.layers.<i>.mlp.)
    router.weight (E, d)                  gate.weight (E, d)
    experts.w1, experts.w3 (E, H, d)      experts.gate_up_proj (E, 2H, d): [w1; w3]
    experts.w2 (E, d, H)                  experts.down_proj (E, d, H)
    expert_bias (E,)                      - (must be 0 to export; 0 on import)

The published checkpoints (and transformers 4) store each expert apart,
`block_sparse_moe.gate.weight` and `block_sparse_moe.experts.<e>.w1/w2/w3.weight`;
`fused_expert_layout` reads those too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import MixtralConfig, PretrainedConfig

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.moe import MoEConfig

StateDict = dict[str, torch.Tensor]
# Per-layer keys of a dense Llama MLP, absent from a Mixtral layer.
DENSE_MLP_KEYS = ("feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight")


def to_mixtral_config(cfg: TransformerConfig) -> MixtralConfig:
    """The MixtralConfig of `cfg`, refusing MoE settings Mixtral cannot represent; no
    dropout, bos/eos ids unset (as models/llama/hf_config.py's LlamaConfig)."""
    moe = cfg.moe
    unsupported = {
        "shared_experts": (moe.shared_experts, 0),
        "first_dense_layers": (moe.first_dense_layers, 0),
        "every_n_layers": (moe.every_n_layers, 1), "score_func": (moe.score_func, "softmax"),
        "normalize_weights": (moe.normalize_weights, True),
        "capacity_factor": (moe.capacity_factor, None),
    }
    attention = {
        "qkv_bias": (cfg.qkv_bias, False), "qk_norm": (cfg.qk_norm, False),
        "head_dim": (cfg.head_dim, None), "sliding_window": (cfg.sliding_window, None),
        "rope_scaling.type": (cfg.rope_scaling.type, "none"),
    }
    for prefix, settings in (("model.moe.", unsupported), ("model.", attention)):
        for setting, (value, mixtral) in settings.items():
            if value != mixtral:
                raise ConfigError(
                    f"{prefix}{setting}={value!r}: sf-convert writes Mixtral "
                    f"(MixtralForCausalLM) with {setting}={mixtral!r}; a model with it cannot "
                    "be exported to Hugging Face"
                )
    return MixtralConfig(
        hidden_size=cfg.d_model, intermediate_size=moe.expert_hidden or cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coef, sliding_window=None,
        vocab_size=cfg.vocab_rows, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std, bos_token_id=None, eos_token_id=None,
    )


def mixtral_moe_config(hf_config: PretrainedConfig) -> MoEConfig:
    """model.moe of a MixtralConfig (refusing router jitter and a sliding window)."""
    if getattr(hf_config, "router_jitter_noise", 0.0):
        raise ConfigError(
            f"Hugging Face config router_jitter_noise={hf_config.router_jitter_noise!r}: "
            "ScaleForge's router adds no noise; set it to 0"
        )
    window = getattr(hf_config, "sliding_window", None)
    if window is not None and window < hf_config.max_position_embeddings:
        raise ConfigError(
            f"Hugging Face config sliding_window={window!r}: ScaleForge's Mixtral attends "
            "over the whole context; set it to null"
        )
    return MoEConfig(num_experts=hf_config.num_local_experts,
                     top_k=hf_config.num_experts_per_tok,
                     expert_hidden=hf_config.intermediate_size,
                     aux_loss_coef=float(getattr(hf_config, "router_aux_loss_coef", 0.0)))


def to_mixtral_experts(state: Mapping[str, torch.Tensor], cfg: TransformerConfig) -> StateDict:
    """Our MoE tensors -> transformers 5's Mixtral expert tensors (empty for a dense model).
    Raises ConfigError for a nonzero expert bias: Mixtral's router has none."""
    hf: StateDict = {}
    for i in range(cfg.n_layers if cfg.moe.enabled else 0):
        ours, theirs = f"layers.{i}.feed_forward.", f"model.layers.{i}.mlp."
        bias = state[ours + "expert_bias"]
        if not bias.is_meta and bool(bias.any()):
            raise ConfigError(
                f"{ours}expert_bias is not zero (aux-loss-free balancing moved it): Mixtral "
                "routes without a bias, so the exported model would route differently; train "
                "with model.moe.bias_update_rate=0 to export to Mixtral"
            )
        hf[theirs + "gate.weight"] = state[ours + "router.weight"]
        hf[theirs + "experts.gate_up_proj"] = torch.cat(
            [state[ours + "experts.w1"], state[ours + "experts.w3"]], dim=1)
        hf[theirs + "experts.down_proj"] = state[ours + "experts.w2"]
    return hf


def from_mixtral_experts(state: Mapping[str, torch.Tensor], cfg: TransformerConfig
                         ) -> StateDict:
    """transformers 5's Mixtral expert tensors -> ours, expert bias 0 (empty when dense)."""
    ours: StateDict = {}
    for i in range(cfg.n_layers if cfg.moe.enabled else 0):
        mine, theirs = f"layers.{i}.feed_forward.", f"model.layers.{i}.mlp."
        router = state[theirs + "gate.weight"]
        w1, w3 = state[theirs + "experts.gate_up_proj"].chunk(2, dim=1)
        ours |= {mine + "router.weight": router, mine + "experts.w1": w1,
                 mine + "experts.w3": w3, mine + "experts.w2": state[theirs + "experts.down_proj"],
                 mine + "expert_bias": router.new_zeros(router.size(0))}
    return ours


def fused_expert_layout(state: Mapping[str, torch.Tensor], cfg: TransformerConfig) -> StateDict:
    """`state` with the published per-expert Mixtral layout (`block_sparse_moe.`) rewritten
    as transformers 5's fused one; a state already fused is returned as it is."""
    out = dict(state)
    for i in range(cfg.n_layers if cfg.moe.enabled else 0):
        old, new = f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
        if old + "gate.weight" not in out:
            continue
        out[new + "gate.weight"] = out.pop(old + "gate.weight")
        experts = range(cfg.moe.num_experts)
        w1, w2, w3 = ([out.pop(f"{old}experts.{e}.{w}.weight") for e in experts]
                      for w in ("w1", "w2", "w3"))
        out[new + "experts.gate_up_proj"] = torch.cat([torch.stack(w1), torch.stack(w3)], 1)
        out[new + "experts.down_proj"] = torch.stack(w2)
    return out
