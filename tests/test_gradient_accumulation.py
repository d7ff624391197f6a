"""Gradient accumulation under FSDP keeps ZeRO-3's memory (parallel/data_parallel.py): each
micro-batch's gradients are reduce-scattered in its backward, so between micro-batches a
rank holds sharded gradients only, never a full one. Two gloo ranks at dp_shard=2 run the
trainer's own train module step; memory is counted with torch's MemTracker (bytes of live
tensor storages, FSDP's storage resizes included), so the figures are exact and the same on
every machine. The control run turns the reduce-scatter off until the last micro-batch,
as the trainer did before (FSDP1's `no_sync`), and must break the bounds."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor

import scaleforge.core.train_modules.plain as plain_module
import scaleforge.parallel.pipeline as pipeline_module
from distributed import run_distributed_test
from micro_runs import micro_config, synthetic_data
from scaleforge.core.config import Config, build_plan
from scaleforge.core.trainer import Trainer, start_topology
from scaleforge.data_pipeline.batch import Batch
from scaleforge.models import build
from scaleforge.models.loss import cross_entropy
from scaleforge.parallel.parallelize import parallelize
from scaleforge.parallel.pipeline import ShardedGradientStage, build_pipeline, pipeline_step
from scaleforge.torch_compat import mem_tracker

# 8 blocks, so one block's transient gradients are small beside the whole model's; 2 x 64
# tokens per micro-batch, so what one micro-batch's forward keeps exceeds the sharded
# gradients (the yardstick, below, is then the looser of the two).
OVERRIDES = ["parallel.dp_shard=2", "model.n_layers=4", "trainer.micro_batch_size=2",
             "data.seq_len=32"]
TOKENS_PER_MICRO_BATCH = 2 * 2 * 32  # over both data-parallel ranks
# Besides the gradients, a rank keeps a few small tensors between micro-batches (the last
# inputs and targets, the running loss).
SLACK = 16 * 1024


def _no_sync_until_last(model: nn.Module, last_micro_batch: bool) -> None:
    model.set_requires_gradient_sync(last_micro_batch)


def _live_bytes(tracker: Any) -> int:
    return tracker.get_tracker_snapshot()[torch.device("cpu")]["Total"]


def _measure(cfg: Config, run_dir: Path, micro_batches: int) -> dict:
    """One train module step of `cfg` with `micro_batches` under MemTracker: live bytes at its
    start, its peak, live bytes after each non-final micro-batch and whether every gradient
    was then a sharded DTensor, and what the first micro-batch's forward left alive."""
    cfg = copy.deepcopy(cfg)
    cfg.trainer.global_batch_tokens = TOKENS_PER_MICRO_BATCH * micro_batches
    topology = start_topology(cfg, dist.get_world_size())
    data = synthetic_data(cfg, dp_rank=topology.dp_rank, dp_size=topology.dp_size)
    trainer = Trainer(cfg, run_dir, dist.get_world_size(), data=data, topology=topology)
    assert trainer.micro_batches == micro_batches
    model = trainer.model_parts[0]
    params = list(model.parameters())
    tracker = mem_tracker()
    tracker.track_external(model)
    forward: list[int] = []
    # The model's forward, from its first module (FSDP's root gathers before it) to the
    # logits (the training step runs it as `Transformer.loss`, whose loss follows).
    model.tok_embeddings.register_forward_pre_hook(lambda *_: forward.append(_live_bytes(tracker)))
    model.output.register_forward_hook(lambda *_: forward.append(_live_bytes(tracker)))
    between: list[int] = []
    sharded: list[bool] = []

    def batches():
        for index in itertools.count():
            # Each micro-batch's forward is a new iteration to the tracker; its peak stays.
            tracker.reset_mod_stats()
            if index:
                between.append(_live_bytes(tracker))
                sharded.append(all(
                    isinstance(p.grad, DTensor) and p.grad.placements == p.placements
                    and p.grad.to_local().shape == p.to_local().shape
                    and p.grad.to_local().numel() < p.numel()
                    for p in params))
            yield next(trainer.train_batches)

    with tracker:
        start = _live_bytes(tracker)
        trainer.train_module.step(batches())
    return {
        "start": start,
        "peak": tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"],
        "between": between,
        "sharded": sharded,
        "forward": forward[1] - forward[0],
        "sharded_grad_bytes": sum(p.to_local().numel() * 4 for p in params),
        "largest_group_bytes": max(
            sum(fsdp_param.sharded_param.numel() * 4
                for fsdp_param in module._get_fsdp_state()._fsdp_param_group.fsdp_params)
            for module in model.modules()
            if isinstance(module, FSDPModule) and module._get_fsdp_state()._fsdp_param_group),
    }


def _check_accumulation_memory(cfg: Config, run_dir: Path) -> None:
    one = _measure(cfg, run_dir / "one", 1)
    four = _measure(cfg, run_dir / "four", 4)
    with mock.patch.object(plain_module, "set_gradient_reduction", _no_sync_until_last):
        control = _measure(cfg, run_dir / "control", 4)
    sharded_grads = four["sharded_grad_bytes"]
    extra = four["peak"] - one["peak"]
    if dist.get_rank() == 0:
        print(f"KiB: peak 1 micro-batch {one['peak'] / 1024:.0f}, 4 micro-batches "
              f"{four['peak'] / 1024:.0f} (no reduce-scatter until the last: "
              f"{control['peak'] / 1024:.0f}); sharded gradients {sharded_grads / 1024:.0f}, "
              f"one micro-batch's forward {one['forward'] / 1024:.0f}; held between "
              f"micro-batches {[(b - four['start']) // 1024 for b in four['between']]} "
              f"(control {[(b - control['start']) // 1024 for b in control['between']]})")
    # After every non-final micro-batch each gradient is a shard (half) of its parameter, and
    # nothing but those shards has been added to what the rank held before the step, save at
    # most one group's full gradient in flight: under gloo the flat reduce-scatter input of
    # the last group reduced (the root's, 256 KiB here) is sometimes released by the comm
    # thread just after its wait returns (FSDP on CUDA keeps that one buffer on purpose).
    assert four["sharded"] == [True] * 3
    in_flight = four["largest_group_bytes"]
    assert in_flight < sharded_grads
    for held in four["between"]:
        assert held - four["start"] <= sharded_grads + in_flight + SLACK
    # The yardstick: 4 micro-batches peak above 1 by at most what one micro-batch's
    # forward keeps (activations, logits, the root's gathered weights); the tighter bound is
    # the sharded gradients that accumulation must keep.
    assert sharded_grads <= one["forward"]
    assert extra <= sharded_grads
    # The control keeps full gradients between micro-batches, and its peak shows them.
    assert control["sharded"] == [False] * 3
    for held in control["between"]:
        assert held - control["start"] > 1.9 * sharded_grads
    assert control["peak"] - one["peak"] > sharded_grads + SLACK


def test_fsdp_accumulation_keeps_gradients_sharded_between_micro_batches(tmp_path):
    cfg = micro_config(tmp_path, *OVERRIDES)
    run_distributed_test(_check_accumulation_memory, world_size=2, func_args=(cfg, tmp_path))


def _sharded_grads_after_each_backward(cfg: Config, stage_class: type) -> list[bool]:
    """Run one step of a single-stage pipeline under FSDP with `stage_class` as its stage;
    for each micro-batch's backward, whether every gradient was a sharded DTensor after it."""
    topology = start_topology(cfg, dist.get_world_size())
    plan = build_plan(cfg, topology.dp_size)
    micro_batches = 4
    torch.manual_seed(0)
    with mock.patch.object(pipeline_module, "ShardedGradientStage", stage_class):
        pipe = build_pipeline(build(cfg.model), topology.group("pp"), "1F1B", 1, micro_batches,
                              cross_entropy, topology.device,
                              prepare_stage=lambda stage: parallelize(stage, topology, plan))
    params = list(pipe.parameters())
    stage = pipe.stages[0]
    backward = stage.backward_maybe_with_nosync
    sharded: list[bool] = []

    def recording_backward(*args, **kwargs):
        result = backward(*args, **kwargs)
        sharded.append(all(isinstance(p.grad, DTensor) and p.grad.to_local().numel() < p.numel()
                           for p in params))
        return result

    stage.backward_maybe_with_nosync = recording_backward
    train, _ = synthetic_data(cfg, dp_rank=topology.dp_rank, dp_size=topology.dp_size)
    batches = itertools.islice(iter(train), micro_batches)
    pipeline_step(pipe, [Batch(batch.inputs, batch.targets) for batch in batches])
    assert all(isinstance(p.grad, DTensor) for p in params)  # reduced by the step's end
    return sharded


def _check_pipeline_stage(cfg: Config) -> None:
    assert _sharded_grads_after_each_backward(cfg, ShardedGradientStage) == [True] * 4
    # torch's own stage keeps them unsharded (no .grad yet) until the schedule's last action.
    assert _sharded_grads_after_each_backward(cfg, PipelineStage) == [False] * 4


def test_pipeline_stage_under_fsdp_reduce_scatters_every_micro_batch(tmp_path):
    """A stage's full backward under FSDP leaves sharded gradients, as the trainer's loop
    does, where torch's stage would keep them unsharded until the step's end (a one-stage
    pipeline at dp_shard=2, the schedules' code path at any pp)."""
    cfg = micro_config(tmp_path, "parallel.dp_shard=2")
    run_distributed_test(_check_pipeline_stage, world_size=2, func_args=(cfg,))
