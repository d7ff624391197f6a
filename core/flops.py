"""Training FLOPs per token and the peak FLOP/s of known accelerators (for MFU).

Counts are for matrix multiplies only (norms, activations and softmax are a rounding
error at these shapes). A multiply-accumulate is 2 FLOPs; backward costs twice forward.
Attention is counted causal by default (the work a causal kernel does, which our `mfu`
uses); `causal=False` counts every key, the convention of torchtitan, Megatron and PaLM
(our `mfu_full_attention`), which reads higher by the attention term.
"""

from __future__ import annotations

import re

import torch

from scaleforge.core.precision import tf32_enabled
from scaleforge.models.config import TransformerConfig
from scaleforge.models.family import family_spec
from scaleforge.models.param_count import attention_params, ffn_params


def matmul_params(cfg: TransformerConfig) -> int:
    """Parameters that take part in a matmul per token: every block's projections and the
    LM head (embedding and position lookups cost no FLOPs); of a MoE layer the router and
    the experts a token is routed to (the active parameters), not every expert."""
    layers = sum(attention_params(cfg, biases=False) + ffn_params(cfg, i, True, biases=False)
                 for i in range(cfg.n_layers))
    return layers + cfg.d_model * cfg.vocab_rows


def attention_flops_per_token(cfg: TransformerConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of QK^T and softmax(QK^T)V over all layers.

    With causal masking the token at position i attends to i + 1 keys, (seq_len + 1) / 2
    on average; without it (the PaLM/Megatron convention) to all seq_len. A sliding window
    w caps both: min(i + 1, w) keys causal, min(seq_len, w) without.
    """
    per_key = family_spec(cfg.family).counts.attention_flops_per_key(cfg)
    return cfg.n_layers * per_key * attended_keys(cfg, seq_len, causal)


def attended_keys(cfg: TransformerConfig, seq_len: int, causal: bool = True) -> float:
    """Keys a query attends to, averaged over the seq_len positions of a row."""
    window = min(seq_len, cfg.sliding_window or seq_len)
    if not causal:
        return window
    # Positions 0 .. window-1 see i + 1 keys, the seq_len - window after them `window` each.
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def training_flops_per_token(cfg: TransformerConfig, seq_len: int, causal: bool = True) -> float:
    """Exact matmul FLOPs of forward + backward per trained token (3x forward)."""
    forward = 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, causal)
    return 3 * forward


# Dense (no 2:4 sparsity) peak FLOP/s of one GPU: (bf16/fp16 tensor core, tf32 tensor core,
# plain fp32), keyed by the words of `torch.cuda.get_device_name` that identify the part.
# From NVIDIA's data sheets; where a sheet prints only the sparse figure (marked * there:
# H100, H200, H800, B200) the dense one is half of it. Sources:
#   H100 SXM/PCIe/NVL: nvidia.com/en-us/data-center/h100 (NVL: 1,671* bf16, 835* tf32, 60 fp32)
#   H200 SXM/NVL: nvidia.com/en-us/data-center/h200 (NVL as H100 NVL); GH200: the data sheet's
#   GPU is the H100/H200 SXM part, same tensor figures; H800: the H100's compute (SXM, PCIe)
#   with NVLink cut; A100 (SXM and PCIe, 40 and 80 GB alike), A10, L4, L40, L40S: their data
#   sheets' dense columns; B200: HGX B200 (4.5* PF bf16, 2.2* PF tf32, 75 TF fp32), GB200:
#   GB200 NVL72 per GPU (5*, 2.5*, 80); A10G (an AWS part, no NVIDIA sheet): AWS's figures as
#   compared in baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference.
_PEAK_FLOPS: dict[tuple[str, ...], tuple[float, float, float]] = {
    ("H100",): (989e12, 494e12, 67e12),  # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("H100", "PCIE"): (756e12, 378e12, 51e12),
    ("H100", "NVL"): (835.5e12, 417.5e12, 60e12),
    ("H200",): (989e12, 494e12, 67e12),  # SXM
    ("H200", "NVL"): (835.5e12, 417.5e12, 60e12),
    ("GH200",): (989e12, 494e12, 67e12),
    ("H800",): (989e12, 494e12, 67e12),  # SXM
    ("H800", "PCIE"): (756e12, 378e12, 51e12),
    ("A100",): (312e12, 156e12, 19.5e12),
    ("A10",): (125e12, 62.5e12, 31.2e12),
    ("A10G",): (70e12, 35e12, 31.2e12),
    ("L4",): (121e12, 60e12, 30.3e12),
    ("L40",): (181e12, 90.5e12, 90.5e12),
    ("L40S",): (362e12, 183e12, 91.6e12),
    ("B200",): (2250e12, 1100e12, 75e12),
    ("GB200",): (2500e12, 1250e12, 80e12),
}


# Dense float8 (e4m3/e5m2) tensor-core FLOP/s, the same parts and sources (every sheet prints
# the sparse figure; dense is half): H100 SXM 3,958*, PCIe 3,026*, NVL 3,341*; H200 as H100
# (SXM and NVL); L4 485*, L40 724*, L40S 1,466*; B200 9*, GB200 10* PF. A100, A10 and A10G
# have no float8 tensor cores: not listed.
_FP8_PEAK_FLOPS: dict[tuple[str, ...], float] = {
    ("H100",): 1979e12, ("H100", "PCIE"): 1513e12, ("H100", "NVL"): 1670.5e12,
    ("H200",): 1979e12, ("H200", "NVL"): 1670.5e12, ("GH200",): 1979e12,
    ("H800",): 1979e12, ("H800", "PCIE"): 1513e12,
    ("L4",): 242.5e12, ("L40",): 362e12, ("L40S",): 733e12,
    ("B200",): 4500e12, ("GB200",): 5000e12,
}


def _best_match(device_name: str, keys: list[tuple[str, ...]]) -> tuple[str, ...] | None:
    words = set(re.findall(r"[A-Z0-9]+", device_name.upper()))
    matches = [key for key in keys if words.issuperset(key)]
    return max(matches, key=len) if matches else None


def fp8_peak_flops_by_name(device_name: str) -> float | None:
    """Dense float8 peak FLOP/s of the GPU called `device_name` (matched as in
    `peak_flops_by_name`), or None for a GPU without float8 tensor cores or not listed."""
    key = _best_match(device_name, list(_FP8_PEAK_FLOPS))
    return _FP8_PEAK_FLOPS[key] if key else None


def fp8_peak_flops(device: torch.device) -> float | None:
    """Dense float8 peak FLOP/s of one `device` (the `mfu_fp8` denominator); None when
    unknown (always on CPU)."""
    if device.type != "cuda":
        return None
    return fp8_peak_flops_by_name(torch.cuda.get_device_name(device))


def peak_flops_by_name(device_name: str, precision: str, tf32: bool) -> float | None:
    """Dense peak FLOP/s of the GPU called `device_name` (as `torch.cuda.get_device_name`
    gives it) for `precision` (bf16 and fp16: the half-precision tensor cores; fp32: the tf32
    tensor cores when `tf32`, else plain fp32), or None for a GPU not in the table.

    The name is split into words (letters and digits, case ignored) and the entry whose
    words all occur in it with the most words wins: "NVIDIA H100 NVL" is the NVL part, not
    the SXM one, and "L40" never matches "NVIDIA L40S" nor "A10" "NVIDIA A100-SXM4-80GB"."""
    key = _best_match(device_name, list(_PEAK_FLOPS))
    if key is None:
        return None
    half, tf32_peak, fp32 = _PEAK_FLOPS[key]
    if precision in ("bf16", "fp16"):
        return half
    return tf32_peak if tf32 else fp32


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of one `device` for `precision` (`peak_flops_by_name`; fp32 counts
    the tf32 rate when float32 matmuls may use TF32), or None when unknown (always on CPU)."""
    if device.type != "cuda":
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device), precision, tf32_enabled())
