"""FLOP accounting against hand counts and torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scaleforge.core.flops import (
    attention_flops_per_token,
    matmul_params,
    peak_flops,
    peak_flops_by_name,
    training_flops_per_token,
)
from scaleforge.models import build
from scaleforge.models.config import TransformerConfig

LLAMA = TransformerConfig(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                          ffn_hidden=192, vocab_size=300, max_seq_len=32)
GPT = TransformerConfig(family="gpt", n_layers=2, d_model=64, n_heads=4, vocab_size=300,
                        max_seq_len=32, tie_embeddings=True)


def test_matmul_parameters_match_a_hand_count():
    # llama per layer: wq 64x64, wk and wv 64x32, wo 64x64, three 64x192 MLP matrices
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 192
    assert matmul_params(LLAMA) == 2 * per_layer + 64 * 300
    # gpt per layer: four 64x64 attention matrices, 64x256 up and 256x64 down
    assert matmul_params(GPT) == 2 * (4 * 64 * 64 + 2 * 64 * 256) + 64 * 300


def test_attention_flops_match_a_hand_count():
    # QK^T and AV: 2 FLOPs per multiply-add, 4 heads x 16 dims, 32 keys, 2 layers
    full = 2 * 2 * 2 * 64 * 32
    assert attention_flops_per_token(LLAMA, 32, causal=False) == full
    assert attention_flops_per_token(LLAMA, 32, causal=True) == full * (33 / 2) / 32


@pytest.mark.parametrize("cfg", [LLAMA, GPT], ids=["llama", "gpt"])
def test_training_flops_match_torch_flop_counter(cfg):
    torch.manual_seed(0)
    model = build(cfg)
    tokens = torch.randint(cfg.vocab_size, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(tokens).float().sum().backward()
    counted = counter.get_total_flops() / tokens.numel()
    # torch's counter has no formula for CPU attention kernels: compare the rest exactly
    attention = 3 * attention_flops_per_token(cfg, 32, causal=False)
    assert counted == training_flops_per_token(cfg, 32, causal=False) - attention
    assert counted == 6 * matmul_params(cfg)


def test_cpu_has_no_peak_so_no_mfu():
    assert peak_flops(torch.device("cpu"), "bf16") is None


@pytest.mark.parametrize(("device_name", "bf16", "tf32", "fp32"), [
    ("NVIDIA H100 80GB HBM3", 989e12, 494e12, 67e12),  # SXM5
    ("NVIDIA H100 PCIe", 756e12, 378e12, 51e12),
    ("NVIDIA H100 NVL", 835.5e12, 417.5e12, 60e12),
    ("NVIDIA H200", 989e12, 494e12, 67e12),
    ("NVIDIA H200 NVL", 835.5e12, 417.5e12, 60e12),
    ("NVIDIA GH200 480GB", 989e12, 494e12, 67e12),
    ("NVIDIA H800", 989e12, 494e12, 67e12),
    ("NVIDIA H800 PCIe", 756e12, 378e12, 51e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 156e12, 19.5e12),
    ("NVIDIA A100-PCIE-40GB", 312e12, 156e12, 19.5e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 156e12, 19.5e12),
    ("NVIDIA A10", 125e12, 62.5e12, 31.2e12),
    ("NVIDIA A10G", 70e12, 35e12, 31.2e12),
    ("NVIDIA L4", 121e12, 60e12, 30.3e12),
    ("NVIDIA L40", 181e12, 90.5e12, 90.5e12),
    ("NVIDIA L40S", 362e12, 183e12, 91.6e12),
    ("NVIDIA B200", 2250e12, 1100e12, 75e12),
])
def test_peak_flops_match_the_whole_device_name(device_name, bf16, tf32, fp32):
    assert peak_flops_by_name(device_name, "bf16", tf32=False) == bf16
    assert peak_flops_by_name(device_name, "fp16", tf32=True) == bf16
    assert peak_flops_by_name(device_name, "fp32", tf32=True) == tf32
    assert peak_flops_by_name(device_name, "fp32", tf32=False) == fp32


@pytest.mark.parametrize("device_name", ["NVIDIA RTX A1000", "NVIDIA H20", "NVIDIA A40",
                                         "Tesla T4", "NVIDIA GeForce RTX 4090"])
def test_devices_outside_the_table_have_no_peak(device_name):
    # a known name inside another word does not count: the RTX A1000 is no A100 (nor A10)
    assert peak_flops_by_name(device_name, "bf16", tf32=False) is None


def test_a_sliding_window_caps_the_attended_keys():
    window = TransformerConfig(**{**LLAMA.__dict__, "sliding_window": 8})
    # causal: positions 0..7 see 1..8 keys, the other 24 see 8 each; full convention: 8 keys
    per_key = 2 * 2 * 2 * 64
    causal_keys = (sum(range(1, 9)) + 24 * 8) / 32
    assert attention_flops_per_token(window, 32) == per_key * causal_keys
    assert attention_flops_per_token(window, 32, causal=False) == per_key * 8
    wider = TransformerConfig(**{**LLAMA.__dict__, "sliding_window": 64})
    assert attention_flops_per_token(wider, 32) == attention_flops_per_token(LLAMA, 32)


def test_training_flops_with_head_dim_biases_and_qk_norm_match_torch_flop_counter():
    cfg = TransformerConfig(**{**LLAMA.__dict__, "head_dim": 24, "qkv_bias": True,
                               "qk_norm": True})
    torch.manual_seed(0)
    model = build(cfg)
    tokens = torch.randint(cfg.vocab_size, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(tokens).float().sum().backward()
    assert counter.get_total_flops() / tokens.numel() == 6 * matmul_params(cfg)
    assert matmul_params(cfg) == 2 * (64 * 96 + 2 * 64 * 48 + 96 * 64 + 3 * 64 * 192) + 64 * 300
