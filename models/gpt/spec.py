"""The gpt family's spec (models/family.py): its checks, parts, plan and counts."""

from __future__ import annotations

from functools import partial

import torch.nn as nn

from scaleforge.errors import ConfigError
from scaleforge.models import decoder_counts as counts
from scaleforge.models.config import TransformerConfig
from scaleforge.models.family import FamilyCounts, FamilySpec
from scaleforge.models.transformer import Attention, GeluMLP


def check_gpt(cfg: TransformerConfig, prefix: str) -> None:
    """GPT-2's layout is fixed: no grouped-query attention, none of llama's options."""
    if cfg.kv_heads != cfg.n_heads:
        raise ConfigError(
            f"{prefix}.n_kv_heads={cfg.n_kv_heads}: the gpt family has no grouped-query "
            "attention; leave it null"
        )
    llama_only = {"qkv_bias": cfg.qkv_bias, "qk_norm": cfg.qk_norm,
                  "head_dim": cfg.head_dim is not None,
                  "rope_scaling": cfg.rope_scaling.type != "none"}
    for setting, used in llama_only.items():
        if used:
            raise ConfigError(
                f"{prefix}.{setting} is a llama-family option; the gpt family "
                "has its own fixed layout: leave it at its default"
            )


def gpt_tp_plan(cfg: TransformerConfig, moe: bool) -> dict[str, str]:
    """Megatron's split of a GPT-2 block (parallel/tensor_parallel.py reads the names)."""
    return {
        "attention_norm": "sequence_parallel",
        "attention": "gather_sequence",
        "attention.wq": "colwise", "attention.wk": "colwise", "attention.wv": "colwise",
        "attention.wo": "rowwise",
        "ffn_norm": "sequence_parallel",
        "feed_forward": "gather_sequence",
        "feed_forward.w1": "colwise", "feed_forward.w2": "rowwise",
    }


def gpt_mlp_params(cfg: TransformerConfig, biases: bool) -> int:
    """w1 and w2, and (biases=True) their biases."""
    weights = 2 * cfg.d_model * cfg.mlp_hidden
    return weights + cfg.mlp_hidden + cfg.d_model if biases else weights


GPT_COUNTS = FamilyCounts(
    attention_params=partial(counts.gqa_attention_params, all_biases=True),
    mlp_params=gpt_mlp_params,
    norm_params=lambda cfg: 2 * cfg.d_model,  # LayerNorm's weight and bias
    position_params=lambda cfg: cfg.max_seq_len * cfg.d_model,
    attention_flops_per_key=counts.gqa_attention_flops_per_key,
    norm_bytes=partial(counts.norm_bytes, rms=False),
    attention_bytes=partial(counts.gqa_attention_bytes, rms=False),
    mlp_bytes=partial(counts.mlp_bytes, rms=False, gated=False),
    attention_output_bytes=counts.gqa_attention_output_bytes,
    matmul_widths=partial(counts.gqa_matmul_widths, gated=False),
    forward_traffic_bytes=partial(counts.forward_traffic_bytes, rms=False, gated=False,
                                  rope=False),
    kv_width=counts.gqa_kv_width,
)

SPEC = FamilySpec(
    name="gpt",
    summary="LayerNorm, learned positions, GELU MLP, biases (GPT-2)",
    check=check_gpt,
    mlp_hidden=lambda cfg: 4 * cfg.d_model,
    make_norm=lambda cfg: nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
    make_attention=partial(Attention, bias=True),
    make_mlp=GeluMLP,
    learned_positions=True,
    rope_dim=lambda cfg: None,
    moe=False,
    tp_plan=gpt_tp_plan,
    hf_module="scaleforge.models.gpt.hf",
    counts=GPT_COUNTS,
)
