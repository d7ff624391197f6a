"""Causal attention of query chunks without a mask (models/chunked_attention.py): each
rank's head and tail chunks under context parallelism, against SDPA over the whole
sequence, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaleforge.models.chunked_attention import chunked_causal_attention
from scaleforge.models.sequence_shard import head_tail_chunks


@pytest.mark.parametrize(("cp", "n_heads", "n_kv_heads", "dtype", "tolerance"), [
    (2, 4, 2, torch.float64, 1e-12),
    (3, 4, 4, torch.float64, 1e-12),
    (4, 6, 2, torch.float32, 2e-6),
])
def test_every_ranks_chunks_match_sdpa_over_the_whole_sequence(cp, n_heads, n_kv_heads, dtype,
                                                               tolerance):
    torch.manual_seed(0)
    B, T, hd = 2, 8 * cp, 16
    q = torch.randn(B, n_heads, T, hd, dtype=dtype, requires_grad=True)
    k = torch.randn(B, n_kv_heads, T, hd, dtype=dtype, requires_grad=True)
    v = torch.randn(B, n_kv_heads, T, hd, dtype=dtype, requires_grad=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for rank in range(cp):
        chunks = head_tail_chunks(T, rank, cp)
        rows = torch.cat([torch.arange(chunk.start, chunk.stop) for chunk in chunks])
        out = chunked_causal_attention(q[:, :, rows], k, v, tuple(c.start for c in chunks))
        torch.testing.assert_close(out, expected[:, :, rows], rtol=tolerance, atol=tolerance)
        rank_dq, rank_dk, rank_dv = torch.autograd.grad(out, (q, k, v), grad[:, :, rows])
        dq, dk, dv = dq + rank_dq, dk + rank_dk, dv + rank_dv
    for actual, reference in zip((dq, dk, dv), expected_grads, strict=True):
        torch.testing.assert_close(actual, reference, rtol=tolerance, atol=tolerance)


def test_bf16_chunks_stay_within_bf16_rounding_of_the_fp32_reference():
    torch.manual_seed(0)
    B, T, hd, cp = 2, 64, 16, 2
    q, k, v = (torch.randn(B, heads, T, hd, requires_grad=True) for heads in (4, 2, 2))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    grads = [torch.zeros_like(t, dtype=torch.float32) for t in low]
    for rank in range(cp):
        chunks = head_tail_chunks(T, rank, cp)
        rows = torch.cat([torch.arange(chunk.start, chunk.stop) for chunk in chunks])
        out = chunked_causal_attention(low[0][:, :, rows], low[1], low[2],
                                       tuple(c.start for c in chunks))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected[:, :, rows], rtol=2e-2, atol=2e-2)
        parts = torch.autograd.grad(out, low, grad[:, :, rows].bfloat16())
        grads = [total + part.float() for total, part in zip(grads, parts, strict=True)]
    for actual, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, reference, rtol=3e-2, atol=3e-2)


def test_backward_keeps_q_k_v_the_output_and_its_log_sum_exp_only():
    q = torch.randn(1, 2, 64, 8, requires_grad=True)  # two chunks of 32 queries
    k = torch.randn(1, 2, 128, 8, requires_grad=True)
    v = torch.randn(1, 2, 128, 8, requires_grad=True)
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunked_causal_attention(q, k, v, (32, 96))
    # q, k, v, the output (as q) and the log-sum-exp (1, 2, 64): nothing of 64 x 128.
    assert sorted(saved) == sorted([q.numel(), k.numel(), v.numel(), q.numel(), 2 * 64])
