"""The deepseek_v3 family's spec (models/family.py): checks, parts, plan and counts.

The block is llama's (RMSNorm, SwiGLU or DeepSeekMoE) with multi-head latent attention
(models/deepseek_v3/attention.py). Its tensor-parallel plan splits the heads: wq (or wq_b)
and wkv_b column-wise, wo row-wise; the small latent projections wq_a and wkv_a and their
norms are replicated (every head reads the whole latent), and the shared RoPE key wk_rope
is replicated with its gradient summed over tp (each rank's heads read it), as torchtitan's
DeepSeek-V3 plan keeps them whole.
"""

from __future__ import annotations

from functools import partial

from scaleforge.errors import ConfigError
from scaleforge.models import decoder_counts as counts
from scaleforge.models.config import TransformerConfig
from scaleforge.models.deepseek_v3.attention import LatentAttention
from scaleforge.models.family import FamilyCounts, FamilySpec, RankSetting
from scaleforge.models.llama.spec import llama_mlp_hidden, llama_tp_plan
from scaleforge.models.transformer import RMSNorm, SwiGLU

# GQA-attention settings multi-head latent attention has no use for, with their defaults.
UNUSED_SETTINGS = {"n_kv_heads": None, "head_dim": None, "qkv_bias": False,
                   "qk_norm": False, "sliding_window": None}


def check_deepseek_v3(cfg: TransformerConfig, prefix: str) -> None:
    """model.mla's widths; the grouped-query settings left at their defaults."""
    cfg.mla.check(f"{prefix}.mla")
    if cfg.mup.enabled:
        raise ConfigError(
            f"{prefix}.mup.base_width={cfg.mup.base_width}: the deepseek_v3 family's latent "
            f"attention has no muP rules here; set {prefix}.mup.base_width=null or use the "
            "llama or gpt family"
        )
    for setting, default in UNUSED_SETTINGS.items():
        if getattr(cfg, setting) != default:
            raise ConfigError(
                f"{prefix}.{setting}={getattr(cfg, setting)!r}: the deepseek_v3 family's "
                f"multi-head latent attention has no such option (its widths are "
                f"{prefix}.mla.*); leave it at {default!r}"
            )


def deepseek_v3_tp_plan(cfg: TransformerConfig, moe: bool) -> dict[str, str]:
    """llama's plan with latent attention's projections in place of wq, wk, wv."""
    plan = {name: style for name, style in llama_tp_plan(cfg, moe).items()
            if name not in ("attention.wq", "attention.wk", "attention.wv")}
    if cfg.mla.q_lora_rank:
        plan |= {"attention.wq_a": "replicate", "attention.q_norm": "replicate",
                 "attention.wq_b": "colwise"}
    else:
        plan["attention.wq"] = "colwise"
    return plan | {"attention.wkv_a": "replicate", "attention.kv_norm": "replicate",
                   "attention.wkv_b": "colwise", "attention.wk_rope": "replicate_local"}


def mla_params(cfg: TransformerConfig, biases: bool = True) -> int:
    """wq (or wq_a, wq_b), wkv_a, wkv_b, wk_rope, wo, and (biases=True, with the other
    vector parameters) the latent norms' weights."""
    mla, d, heads = cfg.mla, cfg.d_model, cfg.n_heads
    q_width = heads * mla.qk_head_dim
    q = d * q_width if not mla.q_lora_rank else mla.q_lora_rank * (d + q_width)
    kv = mla.kv_lora_rank * (d + heads * (mla.qk_nope_head_dim + mla.v_head_dim))
    weights = q + kv + d * mla.qk_rope_head_dim + heads * mla.v_head_dim * d
    norms = mla.q_lora_rank + mla.kv_lora_rank
    return weights + norms if biases else weights


def mla_flops_per_key(cfg: TransformerConfig) -> int:
    """QK^T over p + r channels and the weighted sum of v-wide values, every head."""
    return 2 * cfg.n_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim)


def _latent_norm_bytes(width: int, x: RankSetting) -> float:
    """A replicated latent norm (whole on every tp rank): its fp32 input, rstd and
    normalised tensor, and its output, the next projection's input."""
    return 4 * width + 4 + 2 * x.compute_bytes * width


def mla_bytes(cfg: TransformerConfig, x: RankSetting) -> float:
    """Latent attention and its norm per token on a tp rank: the input of the three linears
    reading the norm, the latent norms, q, k and the zero-padded value into SDPA (each
    p + r wide), its padded output and logsumexp, wo's input, and under cp the K and V
    from the other ranks. The RoPE parts keep only their tables."""
    mla, t, e, heads = cfg.mla, x.tp, x.compute_bytes, cfg.n_heads
    latents = _latent_norm_bytes(mla.kv_lora_rank, x)
    if mla.q_lora_rank:
        latents += _latent_norm_bytes(mla.q_lora_rank, x)
    width = heads * mla.qk_head_dim / t  # q, k, the padded value and output, per rank
    return (counts.norm_bytes(cfg, x, 3, rms=True) + latents + 4 * e * width
            + e * heads * mla.v_head_dim / t + 4 * heads / t
            + (x.cp - 1) * 2 * e * width)


def mla_output_bytes(cfg: TransformerConfig, x: RankSetting) -> float:
    """SDPA's (padded) output and logsumexp, which a selective checkpoint keeps."""
    return x.compute_bytes * cfg.n_heads * cfg.mla.qk_head_dim / x.tp + 4 * cfg.n_heads / x.tp


def mla_matmul_widths(cfg: TransformerConfig, x: RankSetting) -> list[float]:
    """wq (or wq_a, wq_b), wkv_a, wk_rope, wkv_b, wo, then w1, w3, w2; the replicated
    latent projections whole, the head-split ones divided by tp."""
    mla, t, heads = cfg.mla, x.tp, cfg.n_heads
    q_width = heads * mla.qk_head_dim / t
    queries = [q_width] if not mla.q_lora_rank else [float(mla.q_lora_rank), q_width]
    return [*queries, float(mla.kv_lora_rank), float(mla.qk_rope_head_dim),
            heads * (mla.qk_nope_head_dim + mla.v_head_dim) / t, cfg.d_model,
            cfg.mlp_hidden / t, cfg.mlp_hidden / t, cfg.d_model]


def mla_forward_traffic_bytes(cfg: TransformerConfig, x: RankSetting) -> float:
    """llama's block traffic with latent attention's: the latent norms (whole), RoPE over
    the rotated channels, q and k assembled from their parts, the output copy."""
    mla, t, e, r, heads = cfg.mla, x.tp, x.compute_bytes, x.residual_bytes, cfg.n_heads
    width = cfg.d_model / t
    norm = float((r + 4) + (4 + 4) + (4 + e) + 3 * e)
    latent_norms = (mla.kv_lora_rank + mla.q_lora_rank) * float((e + 4) + 8 + (4 + e) + 3 * e)
    casts = 5 * (4 + e) * cfg.d_model if x.autocast else 0.0  # 3 attention, 2 MLP linears
    rotation = 9 * e * (heads * mla.qk_rope_head_dim / t + mla.qk_rope_head_dim)
    assembly = 2 * 2 * e * heads * mla.qk_head_dim / t  # q and k concatenated
    attention_copy = 2 * e * heads * mla.v_head_dim / t
    activation = 5 * e * cfg.mlp_hidden / t
    residual = 2 * (e + 2 * r)
    return (2 * norm * width + latent_norms + casts + rotation + assembly + attention_copy
            + activation + residual * width)


DEEPSEEK_V3_COUNTS = FamilyCounts(
    attention_params=mla_params,
    mlp_params=lambda cfg, biases: 3 * cfg.d_model * cfg.mlp_hidden,
    norm_params=lambda cfg: cfg.d_model,
    position_params=lambda cfg: 0,
    attention_flops_per_key=mla_flops_per_key,
    norm_bytes=partial(counts.norm_bytes, rms=True),
    attention_bytes=mla_bytes,
    mlp_bytes=partial(counts.mlp_bytes, rms=True, gated=True),
    attention_output_bytes=mla_output_bytes,
    matmul_widths=mla_matmul_widths,
    forward_traffic_bytes=mla_forward_traffic_bytes,
    kv_width=lambda cfg: 2 * cfg.n_heads * cfg.mla.qk_head_dim,  # K and the padded V
)

SPEC = FamilySpec(
    name="deepseek_v3",
    summary="llama's block with multi-head latent attention and DeepSeekMoE (DeepSeek-V3)",
    check=check_deepseek_v3,
    mlp_hidden=llama_mlp_hidden,
    make_norm=lambda cfg: RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels),
    make_attention=LatentAttention,
    make_mlp=SwiGLU,
    learned_positions=False,
    rope_dim=lambda cfg: cfg.mla.qk_rope_head_dim,
    moe=True,
    tp_plan=deepseek_v3_tp_plan,
    hf_module="scaleforge.models.deepseek_v3.hf",
    counts=DEEPSEEK_V3_COUNTS,
)
