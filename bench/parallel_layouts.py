"""Time training steps of a small model under each parallel layout, relative to one process.

    python -m scaleforge.bench.parallel_layouts [--steps 10 --warmup 3] [hydra overrides...]

Each layout runs in real processes (torch.multiprocessing, gloo on CPU / NCCL on CUDA, one
thread per rank on CPU) on the same model and global batch; the single-process run uses one
thread too, so a ratio above 1 is parallel speed-up and below 1 is communication and
oversubscription cost. Prints seconds per step, tokens/s, the ratio to one process, the
activations one rank keeps for backward per micro-batch (`saved_activation_bytes`, measured
in the first warm-up step) and, for a MoE model, the expert weights (routed and shared) one
rank holds.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scaleforge.core.config import Config, compose, to_config
from scaleforge.core.trainer import Trainer, start_topology
from scaleforge.data_pipeline.batch import Batch
from scaleforge.planner.shards import local_bytes
from scaleforge.torch_compat import wrapped_tensors

LAYOUTS = {
    "single": [],
    "tp2": ["parallel.tp=2"],
    "dp_shard2": ["parallel.dp_shard=2"],
    "dp_replicate2": ["parallel.dp_replicate=2"],
    "tp2_dp_shard2": ["parallel.tp=2", "parallel.dp_shard=2"],
    "cp2": ["parallel.cp=2"],
    # MoE models (model=moe_tiny): the experts whole on both tp ranks, or split by width.
    "tp2_etp2": ["parallel.tp=2", "parallel.etp=2"],
}
DEFAULTS = [
    "model=llama_tiny", "data.seq_len=256", "trainer.micro_batch_size=4",
    "trainer.global_batch_tokens=4096", "trainer.precision=fp32", "logging.wandb=disabled",
    "logging.progress_bar=false", "optim.warmup_steps=1", "data.vocab_size=4096",
]


def _world_size(overrides: list[str]) -> int:
    size = 1
    for override in overrides:
        key, value = override.split("=")
        if key in ("parallel.tp", "parallel.pp", "parallel.dp_shard", "parallel.dp_replicate",
                   "parallel.cp"):
            size *= int(value)
    return size


def saved_activation_bytes(step: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `step()` runs: the
    activations of all its micro-batches (parameters, leaves that require grad, are not
    counted). Each storage is held until the end, so that none is freed and its address
    reused by another."""
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not (tensor.is_leaf and tensor.requires_grad):
            for storage in _storages(tensor):
                storages[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storage.nbytes() for storage in storages.values())


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's pieces of the MoE layers' routed and shared expert weights."""
    return sum(local_bytes(param) for name, param in model.named_parameters()
               if ".experts." in name or ".shared." in name)


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding `tensor`'s data: its own, or for a wrapper subclass without one
    (DTensor, an async collective's result) those of the tensors it wraps."""
    inner = wrapped_tensors(tensor)
    if inner is None:
        return [tensor.untyped_storage()]
    return [storage for value in inner for storage in _storages(value)]


def _time_steps(world_size: int, cfg: Config, steps: int,
                warmup: int) -> tuple[list[float], int, int]:
    """Seconds of each timed step on this rank (steps separated by a barrier), the
    activation bytes this rank saved per micro-batch in the first warm-up step and its
    expert weights' bytes."""
    topology = start_topology(cfg, world_size)
    generator = torch.Generator().manual_seed(topology.dp_rank)
    window = torch.randint(cfg.model.vocab_rows, (cfg.trainer.micro_batch_size,
                                                  cfg.data.seq_len + 1), generator=generator)
    batch = Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous())
    run_dir = Path(tempfile.mkdtemp(prefix="sf-bench-parallel-"))
    trainer = Trainer(cfg, run_dir, world_size, data=(itertools.repeat(batch), None),
                      topology=topology)
    activations = saved_activation_bytes(
        lambda: trainer.train_step(trainer.train_batches)) // trainer.micro_batches
    times = []
    for step in range(warmup + steps):
        if topology.is_distributed:
            dist.barrier()
        start = time.perf_counter()
        loss, _ = trainer.train_step(trainer.train_batches)
        loss.item()
        if topology.is_distributed:
            dist.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times, activations, expert_bytes(trainer.model_parts)


def _rank(rank: int, world_size: int, port: int, cfg: Config, steps: int, warmup: int,
          out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        measured = _time_steps(world_size, cfg, steps, warmup)
        if rank == 0:
            torch.save(measured, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def time_layout(overrides: list[str], steps: int, warmup: int) -> tuple[float, int, int]:
    """(median seconds per step, rank 0's saved activation bytes per micro-batch, rank 0's
    expert weight bytes) of `overrides` (a layout plus model settings, after DEFAULTS)."""
    cfg = to_config(compose(DEFAULTS + overrides))
    world_size = _world_size(overrides)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = Path(tempfile.mkdtemp(prefix="sf-bench-parallel-")) / "times.pt"
    mp.start_processes(_rank, args=(world_size, port, cfg, steps, warmup, str(out)),
                       nprocs=world_size, join=True, start_method="spawn")
    times, activations, experts = torch.load(out)
    return statistics.median(times), activations, experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per layout")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=gpt_tiny")
    args = parser.parse_args()
    cfg = to_config(compose(DEFAULTS + args.overrides))
    tokens = cfg.trainer.global_batch_tokens
    print(f"torch {torch.__version__} | {os.cpu_count()} CPUs | model {cfg.model.name} | "
          f"{tokens:,} tokens/step | {args.steps} timed steps, median")
    names = ["single"] + [n for n in args.layouts.split(",") if n != "single"]
    baseline = None
    for name in names:
        seconds, activations, experts = time_layout(LAYOUTS[name] + args.overrides,
                                                    args.steps, args.warmup)
        baseline = baseline or seconds
        print(f"{name:>14}: {_world_size(LAYOUTS[name])} ranks | {seconds * 1e3:8.1f} ms/step | "
              f"{tokens / seconds:10,.0f} tokens/s | {baseline / seconds:.2f}x single process | "
              f"activations {activations / 2**20:,.1f} MiB per rank"
              + (f" | experts {experts / 2**20:,.2f} MiB per rank" if experts else ""),
              flush=True)


if __name__ == "__main__":
    main()
