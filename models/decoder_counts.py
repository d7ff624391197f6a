"""Closed-form counts of the parts families share (models/family.FamilyCounts composes them).

Parameters of grouped-query attention; and, after Korthikanti et al. 2022 as
planner/activations.py describes it, the activation bytes per token that a norm, a
grouped-query attention and a dense MLP keep on one tp rank, and the HBM traffic of a
block's memory-bound forward (planner/memory_traffic.py's conventions). `rms` says the
norms are RMSNorm computed in fp32 (llama: fp32 input, rstd and the normalised tensor kept)
rather than LayerNorm (input, mean and rstd); `gated` says the MLP is SwiGLU (four
(b, s, ffn/t) tensors kept, two linears reading its input) rather than GELU (two, one);
`rope` that q and k are rotated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scaleforge.models.config import TransformerConfig
    from scaleforge.models.family import RankSetting


def gqa_attention_params(cfg: TransformerConfig, biases: bool, all_biases: bool) -> int:
    """wq, wk, wv, wo of grouped-query attention, plus (biases=True) their biases (all four
    when `all_biases`, GPT-2; q, k, v with `qkv_bias`, Qwen 2.5) and the per-head q/k norm
    weights (`qk_norm`, head_size each)."""
    q_width, kv_width = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    weights = cfg.d_model * (2 * q_width + 2 * kv_width)
    if not biases:
        return weights
    if all_biases:
        return weights + q_width + 2 * kv_width + cfg.d_model
    qkv_bias = q_width + 2 * kv_width if cfg.qkv_bias else 0
    qk_norm = 2 * cfg.head_size if cfg.qk_norm else 0
    return weights + qkv_bias + qk_norm


def gqa_kv_width(cfg: TransformerConfig) -> int:
    """K and V of the kv heads."""
    return 2 * cfg.kv_heads * cfg.head_size


def gqa_attention_flops_per_key(cfg: TransformerConfig) -> int:
    """QK^T and the weighted sum of V for one query and key over a layer's heads."""
    return 2 * 2 * cfg.n_heads * cfg.head_size


def norm_bytes(cfg: TransformerConfig, x: RankSetting, consumers: int, rms: bool) -> float:
    """A norm over d_model and the gathered input of the `consumers` linears reading it."""
    t, r, e = x.tp, x.residual_bytes, x.compute_bytes
    if rms:  # fp32 input of rms_norm, its rstd, the normalised tensor
        norm = (4 * cfg.d_model + 4 + r * cfg.d_model) / t
    else:  # layer_norm's input, mean and rstd
        norm = (r * cfg.d_model + 8) / t
    copies = consumers if x.autocast else 1
    return norm + copies * e * cfg.d_model


def gqa_attention_bytes(cfg: TransformerConfig, x: RankSetting, rms: bool) -> float:
    """Grouped-query attention and its norm: q, k, v into SDPA, its output and logsumexp,
    wo's reshaped input, the K and V gathered from the other cp ranks, the q/k norms."""
    m, t, e = cfg, x.tp, x.compute_bytes
    qkv_width = (m.n_heads + 2 * m.kv_heads) * m.head_size
    attention = (
        norm_bytes(m, x, 3, rms)
        + e * qkv_width / t  # q, k, v into SDPA
        + 2 * e * m.n_heads * m.head_size / t  # SDPA output, wo's reshaped input
        + 4 * m.n_heads / t  # logsumexp
        + (x.cp - 1) * 2 * e * m.kv_heads * m.head_size / t  # K, V from the other cp ranks
    )
    if m.qk_norm:  # RMSNorm of q and k per head: fp32 input, rstd, the normalised tensor
        qk_width, qk_heads = (m.n_heads + m.kv_heads) * m.head_size, m.n_heads + m.kv_heads
        attention += (4 * qk_width + 4 * qk_heads + e * qk_width) / t
    return attention


def gqa_attention_output_bytes(cfg: TransformerConfig, x: RankSetting) -> float:
    """SDPA's output and logsumexp, which a selective checkpoint keeps."""
    t = x.tp
    return x.compute_bytes * cfg.n_heads * cfg.head_size / t + 4 * cfg.n_heads / t


def mlp_bytes(cfg: TransformerConfig, x: RankSetting, rms: bool, gated: bool) -> float:
    """A dense MLP and its norm."""
    tensors, consumers = (4, 2) if gated else (2, 1)
    return (norm_bytes(cfg, x, consumers, rms)
            + tensors * x.compute_bytes * cfg.mlp_hidden / x.tp)


def gqa_matmul_widths(cfg: TransformerConfig, x: RankSetting, gated: bool) -> list[float]:
    """wq, wk, wv, wo, then w1, w3, w2 (gated) or w1, w2: column-parallel outputs sharded
    by tp, a row-parallel one the full-width partial sum before its reduce-scatter."""
    m, t = cfg, x.tp
    up = [m.mlp_hidden / t] * (2 if gated else 1)
    return [m.n_heads * m.head_size / t, m.kv_heads * m.head_size / t,
            m.kv_heads * m.head_size / t, m.d_model, *up, m.d_model]


def forward_traffic_bytes(cfg: TransformerConfig, x: RankSetting, rms: bool, gated: bool,
                          rope: bool) -> float:
    """HBM bytes per token of a grouped-query block's memory-bound forward on a tp rank:
    norms (RMSNorm: cast, rms_norm, cast back, weight; LayerNorm one kernel), autocast's
    input casts, RoPE (about nine passes over q and k), attention's output copy, the MLP's
    activation (SiLU and the gate product: five passes; GELU: two) and two residual adds."""
    m, t, e, r = cfg, x.tp, x.compute_bytes, x.residual_bytes
    width = m.d_model / t  # sequence-parallel: norms and residual on 1/t of the positions
    norm = float((r + 4) + (4 + 4) + (4 + e) + 3 * e) if rms else 2.0 * r
    casts = (3 + (2 if gated else 1)) * (4 + e) * m.d_model if x.autocast else 0.0
    q_width = m.n_heads * m.head_size / t
    rotation = 9 * e * (q_width + m.kv_heads * m.head_size / t) if rope else 0.0
    attention_copy = 2 * e * q_width
    hidden = m.mlp_hidden / t
    activation = (5 if gated else 2) * e * hidden
    residual = 2 * (e + 2 * r)
    return 2 * norm * width + casts + rotation + attention_copy + activation + residual * width
