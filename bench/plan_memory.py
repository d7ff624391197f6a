"""sf-plan's per-rank memory against what real gloo runs hold, on CPU.

For each layout of a small model, every rank builds the Trainer (as a run does), runs one
training step and then one more forward of a micro-batch while a saved-tensor hook counts
the bytes autograd keeps and selective checkpointing caches (each storage once, parameters
and buffers left out): that is the activation memory of one micro-batch, measured
deterministically (RSS would be noisy).
Parameters, gradients (after the step's backward) and AdamW's state (after its first step)
are read off the tensors. Each is printed next to the planner's figure for the same rank.

    python -m scaleforge.bench.plan_memory
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor

from scaleforge.core.config import Config, compose, to_config, validate
from scaleforge.core.trainer import Trainer, start_topology
from scaleforge.data_pipeline.batch import Batch
from scaleforge.planner.activations import recompute_bytes
from scaleforge.planner.search import activation_setting, rank_memory
from scaleforge.planner.shards import ShardProbe, fake_world, local_bytes
from scaleforge.torch_compat import checkpoint_cache_hook, view_base

# A small Llama (4 blocks, GQA) on CPU in fp32, 4 micro-batches of 2 x 64 tokens per step
# at dp 1; the layouts each run in 1, 2 or 4 gloo processes.
BASE = [
    "model=llama_micro", "model.n_layers=4", "model.d_model=128", "model.n_heads=4",
    "model.n_kv_heads=2", "model.ffn_hidden=384", "data.vocab_size=512", "data.seq_len=64",
    "trainer.micro_batch_size=2", "trainer.global_batch_tokens=512", "trainer.precision=fp32",
    "trainer.device=cpu", "trainer.eval_batches=8", "logging.wandb=disabled",
    "logging.progress_bar=false",
]
# The same blocks with a MoE feed-forward: 8 experts of half the MLP width, top 2 (moe_tiny's).
MOE = ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.expert_hidden=192"]
LAYOUTS: list[tuple[str, int, list[str]]] = [
    ("single process", 1, []),
    ("single, AC full", 1, ["trainer.activation_checkpointing=full"]),
    ("single, AC selective", 1, ["trainer.activation_checkpointing=selective"]),
    ("tp 2, AC selective", 2, ["parallel.tp=2", "trainer.activation_checkpointing=selective"]),
    ("tp 2", 2, ["parallel.tp=2"]),
    ("dp_shard 2", 2, ["parallel.dp_shard=2"]),
    ("tp 2 x dp_shard 2", 4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    ("pp 2 (1F1B)", 2, ["parallel.pp=2"]),
    ("pp 2 (GPipe) x tp 2", 4, ["parallel.pp=2", "parallel.pp_schedule=GPipe", "parallel.tp=2"]),
    ("pp 2 (Interleaved1F1B v2)", 2, ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B",
                                      "parallel.pp_stages_per_rank=2"]),
    ("pp 2 x dp_shard 2", 4, ["parallel.pp=2", "parallel.dp_shard=2",
                              "trainer.micro_batch_size=1"]),
    *((f"MoE 8 x top 2{name}", world_size, [*MOE, *overrides]) for name, world_size, overrides in (
        ("", 1, []), (", shared 1, dense first", 1, ["model.moe.shared_experts=1",
                                                     "model.moe.first_dense_layers=1"]),
        (", tp 2", 2, ["parallel.tp=2"]), (", tp 2 etp 2", 2, ["parallel.tp=2", "parallel.etp=2"]),
    )),
]


class _Saved:
    """A tensor autograd saved, counted while autograd holds it."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """Peak bytes of the tensors autograd keeps for backward (each storage once, while any
    saved tensor still refers to it), leaving out parameters, autocast's weight copies and
    buffers. DTensors count their local shard."""

    def __init__(self, model: nn.Module):
        self.excluded = {self._key(t) for t in (*model.parameters(), *model.buffers())}
        self.live: dict[int, list[int]] = {}  # storage -> [references, bytes]
        self.current = self.peak = 0

    @staticmethod
    def _key(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        try:
            return local.untyped_storage().data_ptr()
        except RuntimeError:  # a storage FSDP has freed (resized to 0): no live bytes
            return -id(local)

    def _is_weight(self, tensor: torch.Tensor) -> bool:
        base = view_base(tensor)
        if isinstance(base, nn.Parameter) or self._key(base) in self.excluded:
            return True
        grad_fn = base.grad_fn  # autocast's cast of a weight: ToCopy of a leaf
        return (grad_fn is not None and type(grad_fn).__name__ == "ToCopyBackward0"
                and type(grad_fn.next_functions[0][0]).__name__ == "AccumulateGrad")

    def _hold(self, tensor: torch.Tensor, holder: object) -> None:
        """Count `tensor` while `holder` lives."""
        key = self._key(tensor)
        entry = self.live.setdefault(key, [0, local_bytes(tensor)])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        weakref.finalize(holder, self._release, key)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type == "meta" or self._is_weight(tensor):
            return tensor
        saved = _Saved(tensor)
        self._hold(tensor, saved)
        return saved

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count what autograd saves and what selective checkpointing caches (each op output
        it keeps is held by torch until backward's recompute takes it), while in this
        block."""
        unpack = lambda saved: saved.tensor if isinstance(saved, _Saved) else saved  # noqa: E731

        def cache(cached: Any, value: Any) -> None:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self._hold(value, cached)

        with checkpoint_cache_hook(cache), \
                torch.autograd.graph.saved_tensors_hooks(self._pack, unpack):
            yield


def measure(cfg: Config, world_size: int) -> dict[str, Any]:
    """One step of `cfg` in this rank (its part of `world_size`): parameters, gradients
    after the backward passes, AdamW's state after the update, and the peak bytes autograd
    kept during the step's forward and backward passes."""
    topology = start_topology(cfg, world_size)
    generator = torch.Generator().manual_seed(topology.dp_rank)
    window = torch.randint(cfg.model.vocab_rows, (cfg.trainer.micro_batch_size,
                                                  cfg.data.seq_len + 1), generator=generator)
    batch = Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous())
    run_dir = Path(tempfile.mkdtemp(prefix="sf-bench-plan-memory-"))
    trainer = Trainer(cfg, run_dir, world_size, data=(itertools.repeat(batch), None),
                      topology=topology)
    meter = SavedTensorMeter(trainer.model_parts)
    trainer.model_parts.train()
    with meter.counting():
        trainer.train_module.step(trainer.train_batches)
    params = list(trainer.model_parts.parameters())
    grads = sum(local_bytes(p.grad) for p in params if p.grad is not None)
    trainer.optimizer.step()
    optimizer = sum(local_bytes(value) for state in trainer.optimizer.state.values()
                    for value in state.values() if isinstance(value, torch.Tensor))
    return {"pp_rank": topology.pp_rank, "dp_rank": topology.dp_rank, "tp_rank": topology.tp_rank,
            "label": topology.label(), "params": sum(local_bytes(p) for p in params),
            "grads": grads, "optimizer": optimizer, "activations": meter.peak}


def _rank(rank: int, world_size: int, port: int, cfg: Config, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        torch.save(measure(cfg, world_size), f"{out}.{rank}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure_layout(cfg: Config, world_size: int) -> list[dict[str, Any]]:
    """Every rank's measurement of one step of `cfg` in `world_size` gloo processes."""
    if world_size == 1:
        return [measure(cfg, 1)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(Path(tempfile.mkdtemp(prefix="sf-bench-plan-memory-")) / "rank")
    mp.start_processes(_rank, args=(world_size, port, cfg, out), nprocs=world_size, join=True,
                       start_method="spawn")
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(world_size)]


def planned(cfg: Config, world_size: int) -> list[dict[str, float]]:
    """sf-plan's figures for each pipeline rank of `cfg` (activations without the block a
    checkpointed backward recomputes, which the meter does not see)."""
    with fake_world(world_size):
        dims, probe = validate(cfg, world_size), ShardProbe(cfg)
        ranks = [rank_memory(cfg, dims, pp_rank, probe) for pp_rank in range(dims.pp)]
    recomputed = recompute_bytes(activation_setting(cfg, dims))
    return [{"params": m.params, "grads": m.grads, "optimizer": m.optimizer,
             "activations": m.activations - recomputed} for m in ranks]


def main() -> None:
    print(f"torch {torch.__version__} | {os.cpu_count()} CPUs | per rank at dp 0, tp 0: "
          "planned / measured bytes (activations: relative error)")
    worst = 0.0
    for name, world_size, overrides in LAYOUTS:
        cfg = to_config(compose(BASE + overrides))
        plan = planned(cfg, world_size)
        for record in measure_layout(cfg, world_size):
            if record["dp_rank"] or record["tp_rank"]:
                continue
            expected = plan[record["pp_rank"]]
            exact = all(int(expected[k]) == record[k] for k in ("params", "grads", "optimizer"))
            error = expected["activations"] / record["activations"] - 1
            worst = max(worst, abs(error))
            print(f"{name:>26} {record['label']}: params {int(expected['params']):,} / "
                  f"{record['params']:,}, grads {int(expected['grads']):,} / "
                  f"{record['grads']:,}, AdamW {int(expected['optimizer']):,} / "
                  f"{record['optimizer']:,} ({'exact' if exact else 'DIFFER'}) | activations "
                  f"{int(expected['activations']):,} / {record['activations']:,} "
                  f"({error:+.1%})", flush=True)
    print(f"largest activation error: {worst:.1%}")
    sys.exit(0 if worst <= 0.25 else 1)


if __name__ == "__main__":
    main()
