"""Run a few training steps under a parallel layout in real processes (gloo, one thread each,
through tests/distributed.py) and record what the numerics tests compare with the
single-process run; and the settings and tolerances those tests share.

The config is composed once in the test and pickled to the ranks; rank 0's record comes back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distributed import run_distributed_test
from micro_runs import synthetic_data
from scaleforge.core.config import Config
from scaleforge.core.trainer import Trainer, start_topology
from scaleforge.parallel.parallelize import gathered_state_dict
from scaleforge.parallel.topology import Topology

# Two micro-batches of 2 sequences per data-parallel rank at dp=2, one at dp=4.
COMMON = ["trainer.micro_batch_size=2", "optim.grad_clip=0.3"]
GPT_MICRO = ["model=gpt_tiny", "model.n_layers=2", "model.d_model=64", "model.vocab_size=512",
             "model.max_seq_len=64"]
# Pipeline layouts through the Trainer: llama_micro with 4 layers (2 stages of 2 layers, or
# 4 of one with 2 stages per rank), 4 micro-batches per step at dp 1 (2 at dp 2), and 4
# evaluation batches (whole schedule rounds on every data-parallel rank).
PIPELINE_MODEL = ["model.n_layers=4", "trainer.eval_batches=4"]
# fp32: per-step losses within 1e-5 relative; final weights within rtol 1e-5 and atol 2e-5,
# i.e. 2% of the learning rate. Adam moves every weight by about lr per step whatever the
# gradient's size, so an entry whose gradient is at float-noise level (the key bias's true
# gradient is exactly zero: softmax ignores it) can take a visibly different step under a
# re-associated sum; the single-process gradient-accumulation test allows 1e-5 for the same
# reason. Measured on 2026-12-01, with the chunked loss: at most 1.77e-5 (llama tp2 and
# tp2 x dp_shard2, one entry of the token embedding), 5.8e-6 (gpt tp2).
LOSS_RTOL, WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-5, 2e-5


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
    MoE metrics per step (`ExpertLoad.metrics`, empty for a dense model), validation loss,
    the parameter layouts and, under pipeline parallelism, every rank's
    stage ids (full weights on rank 0 only).

    The Trainer resumes as `cfg.trainer.resume` says ("start_step" in the result is the step
    it starts from). It checkpoints after each step in `save_at` (and waits for an async
    save before returning). `forget_optimizer_state` clears AdamW's state after resuming:
    the control run of a test that proves the optimizer state was carried over."""
    topology = topology or start_topology(cfg, world_size)
    data = synthetic_data(cfg, dp_rank=topology.dp_rank, dp_size=topology.dp_size)
    trainer = Trainer(cfg, run_dir, world_size, data=data, topology=topology)
    if forget_optimizer_state:
        trainer.optimizer.state.clear()
    start_step = trainer.step
    initial = _copy(gathered_state_dict(trainer.model, topology))
    losses, grad_norms, moe_metrics = [], [], []
    for _ in range(steps):
        loss, grad_norm = trainer.train_step(trainer.train_batches)
        losses.append(topology.mean_over_dp(loss).item())
        grad_norms.append(grad_norm.item())
        moe_metrics.append(trainer.expert_load.metrics())
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
        "moe_metrics": moe_metrics,
        "val_loss": val_loss,
        "placements": placements_by_name(trainer.model),
        "stage_ids": _stage_ids_of_every_rank(trainer, topology),
        "dp_rank": topology.dp_rank,
        "label": topology.label(),
        "autocast": trainer.precision.name,
    }


def _train_in_rank(
    cfg: Config, run_dir: Path, steps: int, save_at: tuple[int, ...]
) -> dict[str, Any]:
    return train_and_record(cfg, run_dir, steps, dist.get_world_size(), save_at=save_at)


def run_layout(
    cfg: Config, world_size: int, steps: int = 5, save_at: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Train `cfg` for `steps` steps in `world_size` processes (in cfg.run_dir),
    checkpointing after the steps in `save_at`; rank 0's record."""
    records = run_distributed_test(_train_in_rank, world_size=world_size,
                                   func_args=(cfg, Path(cfg.run_dir), steps, save_at))
    return records[0]


def _fit_in_rank(cfg: Config) -> None:
    world_size = dist.get_world_size()
    topology = start_topology(cfg, world_size)
    data = synthetic_data(cfg, dp_rank=topology.dp_rank, dp_size=topology.dp_size)
    Trainer(cfg, Path(cfg.run_dir), world_size, data=data, topology=topology).fit()


def fit_layout(cfg: Config, world_size: int) -> None:
    """Run `Trainer.fit()` on `cfg` in `world_size` processes, on the synthetic data of
    micro_runs; rank 0 writes cfg.run_dir/metrics.jsonl and the checkpoints."""
    run_distributed_test(_fit_in_rank, world_size=world_size, func_args=(cfg,))
