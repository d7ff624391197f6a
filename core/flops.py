"""Training FLOPs per token and the peak FLOP/s of known accelerators (for MFU).

Counts are for matrix multiplies only (norms, activations and softmax are a rounding
error at these shapes). A multiply-accumulate is 2 FLOPs; backward costs twice forward.
"""

from __future__ import annotations

import torch

from scaleforge.models.config import TransformerConfig
from scaleforge.models.param_count import attention_params, mlp_params


def matmul_params(cfg: TransformerConfig) -> int:
    """Parameters that take part in a matmul per token: every block's projections and the
    LM head (embedding and position lookups cost no FLOPs)."""
    layer = attention_params(cfg, biases=False) + mlp_params(cfg, biases=False)
    return cfg.n_layers * layer + cfg.d_model * cfg.vocab_size


def attention_flops_per_token(cfg: TransformerConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of QK^T and softmax(QK^T)V over all layers.

    With causal masking the token at position i attends to i + 1 keys, (seq_len + 1) / 2
    on average; without it (the PaLM/Megatron convention) to all seq_len.
    """
    keys = (seq_len + 1) / 2 if causal else seq_len
    return cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.head_dim * keys


def training_flops_per_token(cfg: TransformerConfig, seq_len: int, causal: bool = True) -> float:
    """Exact matmul FLOPs of forward + backward per trained token (3x forward)."""
    forward = 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, causal)
    return 3 * forward


# Dense (no sparsity) peak FLOP/s by compute dtype, from the vendors' data sheets.
_PEAK_FLOPS = {
    # name fragment: (bf16/fp16 tensor core, tf32 tensor core, plain fp32)
    "H200": (989e12, 494e12, 67e12),
    "H100 PCIe": (756e12, 378e12, 51e12),
    "H100": (989e12, 494e12, 67e12),
    "A100": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "L4": (121e12, 60e12, 30.3e12),
    "A10": (125e12, 62.5e12, 31.2e12),
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of `device` for `precision`, or None when unknown (always on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (half, tf32, fp32) in _PEAK_FLOPS.items():
        if fragment in name:
            if precision in ("bf16", "fp16"):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None
