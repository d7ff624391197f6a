"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434, section 2.1).

For the input x (B, T, d) and n heads, with r = qk_rope_head_dim, p = qk_nope_head_dim,
v = v_head_dim (model.mla):

    c_kv   = kv_norm(wkv_a x)                   (B, T, kv_lora_rank)  the compressed KV
    k_nope, value = split(wkv_b c_kv)           (B, T, n, p), (B, T, n, v)
    k_rope = RoPE(wk_rope x)                    (B, T, 1, r)  one RoPE key for all heads
    q      = wq_b q_norm(wq_a x)  or  wq x      (B, T, n, p + r)  (q_lora_rank 0: no latent)
    q      = [q_nope, RoPE(q_rope)]
    k      = [k_nope, k_rope for every head]
    y      = wo attention(q, k, value)          causal, scaled by 1/sqrt(p + r)

(value padded with zeros to p + r channels for the attention kernel, which takes one width;
model.mla.v_head_dim <= p + r).

RoPE is decoupled: only the r channels rotate, so the latent c_kv carries no position
(what lets an inference cache hold c_kv and k_rope instead of every head's K and V).
`wkv_a` and `wk_rope` are Hugging Face's one `kv_a_proj_with_mqa` split in two
(models/deepseek_v3/hf.py), so tensor parallelism can keep the latent replicated and the
RoPE key local (models/deepseek_v3/spec.py's plan). The latent norms take DeepSeek's fixed
epsilon 1e-6, as the reference code and Hugging Face's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaleforge.models.attention import AttentionKernel, make_kernel
from scaleforge.models.config import TransformerConfig
from scaleforge.models.rope import apply_rope
from scaleforge.models.transformer import RMSNorm

LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    """Causal multi-head latent attention (the module docstring)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        mla, d, heads = cfg.mla, cfg.d_model, cfg.n_heads
        # The attention kernel (models/attention/), as every attention module holds one;
        # context parallelism wraps it.
        self.kernel: AttentionKernel = make_kernel(cfg.attention, cfg.sliding_window)
        self.nope_dim, self.rope_dim, self.v_dim = (mla.qk_nope_head_dim, mla.qk_rope_head_dim,
                                                    mla.v_head_dim)
        q_width = heads * mla.qk_head_dim
        self.wq = nn.Linear(d, q_width, bias=False) if not mla.q_lora_rank else None
        self.wq_a = nn.Linear(d, mla.q_lora_rank, bias=False) if mla.q_lora_rank else None
        self.q_norm = (RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS, cfg.kernels)
                       if mla.q_lora_rank else None)
        self.wq_b = nn.Linear(mla.q_lora_rank, q_width, bias=False) if mla.q_lora_rank else None
        self.wkv_a = nn.Linear(d, mla.kv_lora_rank, bias=False)
        self.kv_norm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS, cfg.kernels)
        self.wkv_b = nn.Linear(mla.kv_lora_rank, heads * (self.nope_dim + self.v_dim),
                               bias=False)
        self.wk_rope = nn.Linear(d, self.rope_dim, bias=False)
        self.wo = nn.Linear(heads * self.v_dim, d, bias=False)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.wq is not None:
            return self.wq(x)
        assert self.wq_a is not None and self.q_norm is not None and self.wq_b is not None
        return self.wq_b(self.q_norm(self.wq_a(x)))

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: object,
    ) -> torch.Tensor:
        """`mask`: what `self.kernel.mask` built for this batch."""
        assert rope is not None, "the deepseek_v3 family always has RoPE tables"
        B, T, _ = x.shape
        # Head counts are read from the widths (-1): tensor parallelism splits the heads.
        q = self._queries(x).view(B, T, -1, self.nope_dim + self.rope_dim).transpose(1, 2)
        kv = self.wkv_b(self.kv_norm(self.wkv_a(x)))
        kv = kv.view(B, T, -1, self.nope_dim + self.v_dim).transpose(1, 2)  # (B, n, T, p+v)
        k_nope, value = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = self.wk_rope(x).view(B, T, 1, self.rope_dim).transpose(1, 2)  # (B, 1, T, r)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_rope, *rope)], dim=-1)  # (B, n, T, p+r)
        k_rope = apply_rope(k_rope, *rope).expand(-1, q.size(1), -1, -1)
        k = torch.cat([k_nope, k_rope], dim=-1)  # (B, n, T, p+r)
        # Values padded with zeros to the query/key width: the flash kernels (CPU, CUDA,
        # flash-attn) take one head width, and zero channels add nothing to the output.
        value = F.pad(value, (0, q.size(-1) - self.v_dim))  # (B, n, T, p+r)
        y = self.kernel(q, k, value, mask)  # (B, n, T, p+r)
        y = y[..., :self.v_dim]  # (B, n, T, v)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d_model)
