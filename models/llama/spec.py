"""The llama family's spec (models/family.py): its checks, parts, plan and counts."""

from __future__ import annotations

from functools import partial

from scaleforge.errors import ConfigError
from scaleforge.models import decoder_counts as counts
from scaleforge.models.config import TransformerConfig
from scaleforge.models.family import FamilyCounts, FamilySpec
from scaleforge.models.transformer import Attention, RMSNorm, SwiGLU


def llama_mlp_hidden(cfg: TransformerConfig) -> int:
    """Llama's rule: 2/3 of 4 x d_model times ffn_multiplier, rounded up to a multiple of
    ffn_multiple_of."""
    hidden = int(cfg.ffn_multiplier * int(2 * 4 * cfg.d_model / 3))
    return cfg.ffn_multiple_of * -(-hidden // cfg.ffn_multiple_of)


def check_llama(cfg: TransformerConfig, prefix: str) -> None:
    """RoPE rotates pairs of channels: a head's width must be even."""
    if cfg.head_size % 2:
        raise ConfigError(
            f"{prefix}.head_dim={cfg.head_size} (a head's width) must be even for RoPE"
        )


def llama_tp_plan(cfg: TransformerConfig, moe: bool) -> dict[str, str]:
    """Megatron's split of a llama block (parallel/tensor_parallel.py reads the names)."""
    plan = {
        "attention_norm": "sequence_parallel",
        "attention": "gather_sequence",
        "attention.wq": "colwise", "attention.wk": "colwise", "attention.wv": "colwise",
        "attention.wo": "rowwise",
        "ffn_norm": "sequence_parallel",
    }
    if moe:
        plan["feed_forward"] = "moe"
    else:
        plan |= {"feed_forward": "gather_sequence", "feed_forward.w1": "colwise",
                 "feed_forward.w3": "colwise", "feed_forward.w2": "rowwise"}
    if cfg.qk_norm:  # each rank normalises its own heads with the one shared weight
        plan |= {"attention.q_norm": "head_norm", "attention.k_norm": "head_norm"}
    return plan


LLAMA_COUNTS = FamilyCounts(
    attention_params=partial(counts.gqa_attention_params, all_biases=False),
    mlp_params=lambda cfg, biases: 3 * cfg.d_model * cfg.mlp_hidden,
    norm_params=lambda cfg: cfg.d_model,  # RMSNorm's weight
    position_params=lambda cfg: 0,
    attention_flops_per_key=counts.gqa_attention_flops_per_key,
    norm_bytes=partial(counts.norm_bytes, rms=True),
    attention_bytes=partial(counts.gqa_attention_bytes, rms=True),
    mlp_bytes=partial(counts.mlp_bytes, rms=True, gated=True),
    attention_output_bytes=counts.gqa_attention_output_bytes,
    matmul_widths=partial(counts.gqa_matmul_widths, gated=True),
    forward_traffic_bytes=partial(counts.forward_traffic_bytes, rms=True, gated=True,
                                  rope=True),
    kv_width=counts.gqa_kv_width,
)

SPEC = FamilySpec(
    name="llama",
    summary="RMSNorm, RoPE, SwiGLU, grouped-query attention (Llama, Qwen, Mistral, MoE)",
    check=check_llama,
    mlp_hidden=llama_mlp_hidden,
    make_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels),
    make_attention=Attention,
    make_mlp=SwiGLU,
    learned_positions=False,
    rope_dim=lambda cfg: cfg.head_size,
    moe=True,
    tp_plan=llama_tp_plan,
    hf_module="scaleforge.models.llama.hf",
    counts=LLAMA_COUNTS,
)
