"""Selective activation checkpointing recomputes every other matmul of a block (torchtitan's
op-level policy) and keeps the tensor-parallel collectives' outputs, so under tp its backward
sends no more than a backward without checkpointing (gloo, two ranks)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from distributed import run_distributed_test
from micro_runs import micro_config, synthetic_data
from scaleforge.core.config import Config
from scaleforge.core.trainer import Trainer, start_topology
from scaleforge.models.build import build
from scaleforge.models.loss import cross_entropy
from scaleforge.parallel.activation_checkpoint import SAVED_OPS, apply_activation_checkpointing
from scaleforge.parallel.topology import Topology

_c10d = torch.ops._c10d_functional
COLLECTIVES = {
    _c10d.reduce_scatter_tensor.default,
    _c10d.all_gather_into_tensor.default,
    _c10d.all_reduce.default,
    _c10d.all_to_all_single.default,
}


class CollectiveCount(TorchDispatchMode):
    """Counts the ops of `counted` (the functional collectives by default) run in its
    block, by op name."""

    def __init__(self, counted: set[Any] = COLLECTIVES) -> None:
        super().__init__()
        self.counted = counted
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func in self.counted:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_recomputes_every_other_matmul_of_a_block(tmp_path):
    """llama_micro's blocks run 7 matmuls each (wq wk wv wo w1 w3 w2): backward recomputes
    none of them without checkpointing, 3 (wk, wo, w3) under selective, 6 under full (all
    but w2, whose output no backward needs: torch's recompute stops early)."""
    cfg = micro_config(tmp_path)
    inputs, targets = next(synthetic_data(cfg)[0]).tensors()
    backward_mms = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = build(cfg.model)
        apply_activation_checkpointing(model, mode)
        loss = cross_entropy(model(inputs), targets)
        with CollectiveCount({torch.ops.aten.mm.default}) as backward:
            loss.backward()
        backward_mms[mode] = backward.counts["mm"]
    recomputed = {mode: (count - backward_mms["none"]) / cfg.model.n_layers
                  for mode, count in backward_mms.items()}
    assert recomputed == {"none": 0, "selective": 3, "full": 6}, backward_mms


def test_selective_save_list_holds_the_functional_collectives():
    assert COLLECTIVES <= SAVED_OPS


def _collectives_of_one_micro_batch(cfg: Config, topology: Topology) -> dict[str, Any]:
    """Collectives counted in forward and in backward of one micro-batch under `cfg`, and
    the loss and this rank's gradient shards."""
    mode = cfg.trainer.activation_checkpointing
    trainer = Trainer(cfg, Path(cfg.run_dir) / mode, data=synthetic_data(cfg),
                      topology=topology)
    inputs, targets = next(trainer.train_batches).tensors()
    with CollectiveCount() as forward:
        loss = cross_entropy(trainer.model_parts[0](inputs), targets)
    with CollectiveCount() as backward:
        loss.backward()
    # In parameter order (checkpointing puts its wrapper's prefix into the names).
    grads = [param.grad.to_local().clone() for param in trainer.model_parts.parameters()]
    return {"forward": forward.counts, "backward": backward.counts,
            "loss": loss.item(), "grads": grads}


def _compare_modes_in_rank(configs: dict[str, Config]) -> None:
    topology = start_topology(configs["none"], dist.get_world_size())
    runs = {mode: _collectives_of_one_micro_batch(cfg, topology)
            for mode, cfg in configs.items()}
    none, selective, full = runs["none"], runs["selective"], runs["full"]
    assert none["forward"]["all_gather_into_tensor"] > 0, none["forward"]  # tp communicates
    assert selective["forward"] == none["forward"] == full["forward"]
    assert selective["backward"] == none["backward"], (selective["backward"], none["backward"])
    # Full checkpointing re-runs forward's collectives: what selective would do without them.
    assert full["backward"]["all_gather_into_tensor"] > none["backward"]["all_gather_into_tensor"]
    assert selective["loss"] == none["loss"]
    for checkpointed, plain in zip(selective["grads"], none["grads"], strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


def test_tp2_selective_checkpointing_backward_repeats_no_collective(tmp_path):
    configs = {mode: micro_config(tmp_path, "parallel.tp=2",
                                  f"trainer.activation_checkpointing={mode}")
               for mode in ("none", "selective", "full")}
    run_distributed_test(_compare_modes_in_rank, world_size=2, func_args=(configs,))
