"""Run a few training steps under a parallel layout in real processes (gloo, one thread each)
and collect what the numerics tests compare with the single-process run.

Workers are started with torch.multiprocessing (spawn); the config is composed once in the
parent and pickled to them. Rank 0 writes its results to a file the parent reads back.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from scaleforge.core.config import Config
from scaleforge.core.trainer import Trainer, start_topology
from scaleforge.data_pipeline.loader import TokenWindows, TrainBatches, ValBatches
from scaleforge.parallel.parallelize import gathered_state_dict
from scaleforge.parallel.topology import Topology


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dp_data(cfg: Config, dp_rank: int, dp_size: int, num_windows: int = 64, seed: int = 0):
    """The conftest's synthetic token stream, shared out to data-parallel rank `dp_rank`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.data.vocab_size, num_windows * cfg.data.seq_len + 1)
    windows = TokenWindows(tokens.astype(np.uint16), cfg.data.seq_len)
    mbs = cfg.trainer.micro_batch_size
    train = TrainBatches(windows, mbs, cfg.data.seed, dp_rank, dp_size)
    return iter(train), ValBatches(windows, mbs, dp_rank, dp_size)


def placements_by_name(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (mesh shape, placements) of every DTensor parameter."""
    return {
        name: (tuple(p.device_mesh.shape), str(p.placements))
        for name, p in model.named_parameters()
        if isinstance(p, DTensor)
    }


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _stage_ids_of_every_rank(trainer: Trainer, topology: Topology) -> list[list[int]] | None:
    """The pipeline stages each rank ran, in rank order; None without a pipeline."""
    if trainer.pipeline is None:
        return None
    stage_ids: list[list[int]] = [[] for _ in range(topology.world_size)]
    dist.all_gather_object(stage_ids, trainer.pipeline.stage_ids)
    return stage_ids


def train_and_record(
    cfg: Config,
    run_dir: Path,
    steps: int,
    world_size: int,
    topology: Topology | None = None,
    save_at: tuple[int, ...] = (),
    forget_optimizer_state: bool = False,
) -> dict[str, Any]:
    """Train `steps` steps; return initial and final full weights, losses, grad norms,
    validation loss, the parameter layouts and, under pipeline parallelism, every rank's
    stage ids (full weights on rank 0 only).

    The Trainer resumes as `cfg.trainer.resume` says ("start_step" in the result is the step
    it starts from). It checkpoints after each step in `save_at` (and waits for an async
    save before returning). `forget_optimizer_state` clears AdamW's state after resuming:
    the control run of a test that proves the optimizer state was carried over."""
    topology = topology or start_topology(cfg, world_size)
    data = dp_data(cfg, topology.dp_rank, topology.dp_size)
    trainer = Trainer(cfg, run_dir, world_size, data=data, topology=topology)
    if forget_optimizer_state:
        trainer.optimizer.state.clear()
    start_step = trainer.step
    initial = _copy(gathered_state_dict(trainer.model, topology))
    losses, grad_norms = [], []
    for _ in range(steps):
        loss, grad_norm = trainer.train_step(trainer.train_batches)
        losses.append(topology.mean_over_dp(loss).item())
        grad_norms.append(grad_norm.item())
        if trainer.step in save_at:
            trainer.save_checkpoint()
    trainer.checkpointer.wait()
    val_loss = trainer.evaluate()
    final = gathered_state_dict(trainer.model, topology)
    return {
        "start_step": start_step,
        "initial": initial,
        "final": _copy(final),
        "losses": losses,
        "grad_norms": grad_norms,
        "val_loss": val_loss,
        "placements": placements_by_name(trainer.model),
        "stage_ids": _stage_ids_of_every_rank(trainer, topology),
        "dp_rank": topology.dp_rank,
        "label": topology.label(),
        "autocast": trainer.precision.name,
    }


def _entry(rank: int, world_size: int, port: int, fn, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    try:
        result = fn(world_size, *args)
        if rank == 0:
            torch.save(result, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world_size: int, tmp_path: Path, *args: Any) -> Any:
    """Run `fn(world_size, *args)` in `world_size` spawned ranks (env set as torchrun sets
    it); return rank 0's result. `fn` must be importable (a module-level function)."""
    out = tmp_path / "result.pt"
    mp.start_processes(
        _entry, args=(world_size, free_port(), fn, str(out), args), nprocs=world_size,
        join=True, start_method="spawn",
    )
    return torch.load(out, weights_only=False)


def _train_worker(
    world_size: int, cfg: Config, run_dir: Path, steps: int, save_at: tuple[int, ...]
) -> dict[str, Any]:
    return train_and_record(cfg, run_dir, steps, world_size, save_at=save_at)


def run_layout(
    cfg: Config, world_size: int, tmp_path: Path, steps: int = 5, save_at: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Train `cfg` for `steps` steps in `world_size` spawned processes (in cfg.run_dir),
    checkpointing after the steps in `save_at`; rank 0's record."""
    return spawn(_train_worker, world_size, tmp_path, cfg, Path(cfg.run_dir), steps, save_at)


def _fit_worker(world_size: int, cfg: Config) -> None:
    topology = start_topology(cfg, world_size)
    data = dp_data(cfg, topology.dp_rank, topology.dp_size)
    Trainer(cfg, Path(cfg.run_dir), world_size, data=data, topology=topology).fit()


def fit_layout(cfg: Config, world_size: int, tmp_path: Path) -> None:
    """Run `Trainer.fit()` on `cfg` in `world_size` spawned processes, on the synthetic data
    of `dp_data`; rank 0 writes cfg.run_dir/metrics.jsonl and the checkpoints."""
    spawn(_fit_worker, world_size, tmp_path, cfg)
