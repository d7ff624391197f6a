"""Gradients under sequence parallelism and global-norm clipping across meshes and stages,
in two real gloo processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from distributed import run_distributed_test
from micro_runs import micro_config
from scaleforge.core.config import build_plan
from scaleforge.core.trainer import start_topology
from scaleforge.models import build
from scaleforge.models.loss import cross_entropy
from scaleforge.parallel.grad_clip import clip_grad_norm
from scaleforge.parallel.parallelize import build_model


def _check_sequence_parallel_norm_grads(cfg) -> None:
    topology = start_topology(cfg)
    torch.manual_seed(0)
    reference = build(cfg.model)
    torch.manual_seed(0)
    model = build_model(build_plan(cfg, topology.dp_size), topology)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    cross_entropy(reference(inputs), targets).backward()
    cross_entropy(model(inputs), targets).backward()
    expected = dict(reference.named_parameters())
    result = {}
    for name, param in model.named_parameters():
        if not name.endswith("norm.weight"):
            continue
        # The weight is replicated; its gradient is a pending sum over the tp ranks (each saw
        # its own positions), reduced when the optimizer or the clipping reads it.
        assert isinstance(param.grad, DTensor), name
        assert param.grad.placements in ((Partial(),), (Replicate(),)), name
        reduced = param.grad.redistribute(placements=[Replicate()]).to_local()
        result[name] = {
            "partial": _gather(param.grad.to_local(), topology),
            "reduced": _gather(reduced, topology),
            "expected": expected[name].grad,
        }
    assert set(result) == {"layers.0.attention_norm.weight", "layers.0.ffn_norm.weight",
                           "layers.1.attention_norm.weight", "layers.1.ffn_norm.weight",
                           "norm.weight"}
    for name, grads in result.items():
        expected = grads["expected"]
        # Before the reduction each rank holds only its positions' share (so the test would
        # catch a missing reduction); the shares sum to the full gradient.
        assert not torch.allclose(grads["partial"][0], expected, rtol=1e-3), name
        torch.testing.assert_close(sum(grads["partial"]), expected, rtol=1e-5, atol=1e-7)
        for reduced in grads["reduced"]:
            torch.testing.assert_close(reduced, expected, rtol=1e-5, atol=1e-7, msg=name)


def _gather(tensor: torch.Tensor, topology) -> list[torch.Tensor]:
    gathered = [torch.empty_like(tensor) for _ in range(topology.dims.tp)]
    dist.all_gather(gathered, tensor.contiguous(), group=topology.group("tp"))
    return gathered


def test_sequence_parallel_norm_weight_grads_are_reduced_over_tp(tmp_path):
    """Each tp rank normalises only its half of the sequence; its norm-weight gradient must
    still equal the single-process gradient over the whole sequence, on every rank."""
    cfg = micro_config(tmp_path, "parallel.tp=2")
    run_distributed_test(_check_sequence_parallel_norm_grads, world_size=2, func_args=(cfg,))


def _check_clip_across_meshes(cfg) -> None:
    topology = start_topology(cfg)
    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(8, 4, generator=generator), torch.randn(6, generator=generator)]
    meshes = [(topology.mesh["dp_shard"], [Shard(0)]),
              (topology.mesh["dp_replicate", "dp_shard"], [Replicate(), Shard(0)])]
    params = []
    for grad, (mesh, placements) in zip(full, meshes, strict=True):
        param = nn.Parameter(distribute_tensor(torch.zeros_like(grad), mesh, placements))
        param.grad = distribute_tensor(grad, mesh, placements)
        params.append(param)
    norm = clip_grad_norm(params, max_norm=0.5)
    clipped = [p.grad.full_tensor() for p in params]
    g1, g2 = full
    expected = torch.sqrt(g1.square().sum() + g2.square().sum())
    torch.testing.assert_close(norm, expected)
    scale = 0.5 / (expected + 1e-6)
    torch.testing.assert_close(clipped[0], g1 * scale)
    torch.testing.assert_close(clipped[1], g2 * scale)


def test_clip_grad_norm_is_global_across_meshes(tmp_path):
    cfg = micro_config(tmp_path, "parallel.dp_shard=2")
    run_distributed_test(_check_clip_across_meshes, world_size=2, func_args=(cfg,))


def _check_clip_across_pipeline_stages(cfg) -> None:
    topology = start_topology(cfg)
    grad = torch.full((4,), float(topology.pp_rank + 1))  # stage r holds its own parameter
    param = nn.Parameter(torch.zeros(4))
    param.grad = grad.clone()
    norm = clip_grad_norm([param], max_norm=1.0, pp_group=topology.pp_group)
    expected = torch.tensor(4 * 1.0 + 4 * 4.0).sqrt()  # stages hold 1s and 2s
    torch.testing.assert_close(norm, expected)
    torch.testing.assert_close(param.grad, grad / (expected + 1e-6))


def test_clip_grad_norm_sums_over_pipeline_stages(tmp_path):
    cfg = micro_config(tmp_path, "parallel.pp=2")
    run_distributed_test(_check_clip_across_pipeline_stages, world_size=2, func_args=(cfg,))
