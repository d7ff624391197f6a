"""Context parallelism's CUDA paths on one GPU (marked `cuda`: skipped without one): the
mask-free causal attention of query chunks on CUDA's memory-efficient kernel, and
parallel.cp_impl=torch (torch's context-parallel SDPA) on a cp mesh of one rank, where it
must give the plain model's numbers. cp = 2 needs two GPUs; the parity of the layouts is
proven on CPU with the allgather implementation (test_parallel_layouts.py). Seconds each."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_distributed_test
from scaleforge.models import TransformerConfig, build
from scaleforge.models.chunked_attention import chunked_causal_attention
from scaleforge.models.sequence_shard import head_tail_chunks

pytestmark = pytest.mark.cuda

CP = 2
# bf16 operands against the fp32 reference: relative errors of 1e-3 to 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_attention_on_cuda_matches_sdpa_over_the_whole_sequence(dtype):
    generator = torch.Generator().manual_seed(0)
    B, T, hd = 2, 256, 64
    q, k, v = (torch.randn(B, heads, T, hd, generator=generator).cuda()
               for heads in (8, 2, 2))
    grad = torch.randn(B, 8, T, hd, generator=generator).cuda()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    grads = [torch.zeros_like(t) for t in low]
    for rank in range(CP):
        chunks = head_tail_chunks(T, rank, CP)
        rows = torch.cat([torch.arange(c.start, c.stop) for c in chunks]).cuda()
        out = chunked_causal_attention(low[0][:, :, rows], low[1], low[2],
                                       tuple(c.start for c in chunks))
        tolerance = TOLERANCE[dtype]
        torch.testing.assert_close(out.float(), expected[:, :, rows], rtol=tolerance,
                                   atol=tolerance)
        for total, part in zip(grads, torch.autograd.grad(out, low, grad[:, :, rows].to(dtype)),
                               strict=True):
            total += part
    for actual, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual.float(), reference, rtol=TOLERANCE[dtype],
                                   atol=TOLERANCE[dtype])


def _torch_cp_on_one_rank() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from scaleforge.parallel.torch_cp_attention import TorchCPKernel, torch_ring_attention

    assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("cp",))
    cfg = TransformerConfig(n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, ffn_hidden=256,
                            vocab_size=101, max_seq_len=128)
    tokens = torch.randint(0, 101, (2, 128), generator=torch.Generator().manual_seed(1)).cuda()
    runs = []
    for ring in (None, torch_ring_attention(mesh)):
        model = build(cfg, device="cuda", seed=3)
        if ring is not None:  # one rank: its head and tail chunks are the whole sequence
            for block in model.layers.values():
                block.attention.kernel = TorchCPKernel(block.attention.kernel, 0, 1, ring)
        logits = model(tokens)
        logits.square().mean().backward()
        runs.append((logits.detach(), [p.grad for p in model.parameters()]))
    (plain, plain_grads), (ring_logits, ring_grads) = runs
    torch.testing.assert_close(ring_logits, plain, rtol=1e-5, atol=1e-5)
    for ring_grad, plain_grad in zip(ring_grads, plain_grads, strict=True):
        torch.testing.assert_close(ring_grad, plain_grad, rtol=1e-5, atol=1e-6)


def test_torch_cp_impl_on_a_one_rank_mesh_gives_the_plain_models_numbers():
    run_distributed_test(_torch_cp_on_one_rank, world_size=1, backend="nccl")
