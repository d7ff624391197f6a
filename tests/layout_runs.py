"""Run a few training steps under a parallel layout in real processes (gloo, one thread each,
through tests/distributed.py) and record what the numerics tests compare with the
single-process run; and the settings and tolerances those tests share.

The config is composed once in the test and pickled to the ranks; rank 0's record comes back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distributed import run_distributed_test
from micro_runs import synthetic_data
from scaleforge.core.config import Config
from scaleforge.core.trainer import Trainer, start_topology
from scaleforge.parallel.collectives import mean_over_dp_and_cp
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
# What the fp32 parallel-vs-one-process tests bound, and why on any CPU.
#
# Both runs start from bitwise equal weights (checked) and do the same arithmetic in another
# order: a layout splits matmuls and sums over tp/cp/dp ranks, micro-batches and pipeline
# stages, and BLAS (MKL, oneDNN, OpenBLAS on ARM) blocks and threads its reductions by shape,
# ISA and thread count. An fp32 sum of N terms in ANY order, with or without FMA, is within
# N u sum|terms| of the exact sum (u = 2^-24), so two orders differ by at most 2 N u
# sum|terms| whatever the CPU or thread count; the longest reduction here is over the 512
# tokens of a step (global_batch_tokens): 6e-5 of the sum of magnitudes, per operation.
#
# - Losses and validation loss (LOSS_RTOL, relative): a mean of positive cross-entropy terms
#   (no cancellation), moved by rounding and, from step 2 on, by the weights' differences,
#   each entry's effect g_i dw_i at most lr (1 + C) GRADIENT_NOISE times the tensor's gradient
#   scale by the weight bound below, and random in sign. Measured at most 3e-7 (any layout).
# - Grad norms (LOSS_RTOL): dominated by the large gradients, whose sums rounding moves by
#   their relative error above. Measured at most 2.2e-7.
# - Weights after Adam (assert_weights_match): Adam divides each step by sqrt(v) + eps, so a
#   gradient entry at rounding-noise level (a cancelled sum; the key bias's gradient is
#   exactly zero in exact arithmetic) can take a full step of either sign: no flat atol is
#   both safe and tight (2e-5 failed on tp2 x pp2 at 2.8e-5 to 3.4e-5, cp2 x pp2 at 1.1e-4).
#   So each entry gets its own bound from the one-process run's second moments
#   (adam_weight_bounds): if the other run's gradients differ by at most D in every step,
#   its step direction m'/(sqrt(v')+eps) differs by at most (1 + C_t) D / (sqrt(v_t) + eps)
#   (the bias-corrected m moves by at most D, and sqrt(v) by at most D by the triangle
#   inequality), and never by more than 2 C_t, C_t = max |m|/sqrt(v) for Adam's betas at step
#   t (Cauchy-Schwarz: 1.0 to 1.17 for 0.9, 0.95). Decoupled weight decay only shrinks a
#   difference. Summed over the steps, times their learning rates, that bounds each weight.
#   The one assumption is D: GRADIENT_NOISE (2^-10) times the tensor's largest sqrt(v) over
#   the run (for a bias, its weight's if larger), for the rounding bound above through the
#   ~15 reductions of a 2-4 layer model's backward, plus earlier steps' weight differences
#   fed back. The smallest GRADIENT_NOISE that passes, measured (AMD EPYC, 2026-12-07):
#   5.5e-5 (cp2 x pp2), 1.7e-5 (tp2 x pp2), 3.9e-6 (tp2, tp2 x dp_shard2), so 2^-10 leaves
#   18x; a real gradient bug needs far more: rank 1's last micro-batch of tok_embeddings'
#   gradient halved under tp2 x pp2 needs 5e-2 (its weights are 54 times the bound off).
#   An entry whose sqrt(v) is its tensor's largest is held to about 2 GRADIENT_NOISE sum(lr),
#   7e-6 here (sum(lr) = 2.7e-3 over 5 steps); the median entry to about 3e-5.
LOSS_RTOL = 1e-5
GRADIENT_NOISE = 2**-10
# Kept for the tests that compare tensors Adam did not update (MoE expert bias: it moves by
# +-rate per step on integer token counts, so any flipped routing decision shows as 2 rate).
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 2e-5


def placements_by_name(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (mesh shape, placements) of every DTensor parameter."""
    return {
        name: (tuple(p.device_mesh.shape), str(p.placements))
        for name, p in model.named_parameters()
        if isinstance(p, DTensor)
    }


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def adam_record(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An empty record of AdamW's steps in one process, for adam_weight_bounds: its betas
    and eps; record_adam_step adds each step's learning rate and sqrt(v)."""
    group = optimizer.param_groups[0]
    return {"betas": group["betas"], "eps": group["eps"], "lrs": [], "sqrt_v": []}


def record_adam_step(record: dict[str, Any], model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
    """Add the step `optimizer` just took to `record`: its learning rate and, by state-dict
    key, the sqrt of each parameter's bias-corrected second moment (the denominator without
    eps); one process only."""
    beta2 = optimizer.param_groups[0]["betas"][1]
    moments = {}
    for name, param in model.state_dict(keep_vars=True).items():
        state = optimizer.state.get(param)
        if state:  # tied weights appear under both keys
            correction = 1 - beta2 ** float(state["step"])
            moments[name] = (state["exp_avg_sq"].detach() / correction).sqrt().cpu().clone()
    record["lrs"].append(optimizer.param_groups[0]["lr"])
    record["sqrt_v"].append(moments)


def _stage_ids_of_every_rank(trainer: Trainer, topology: Topology) -> list[list[int]] | None:
    """The pipeline stages each rank ran, in rank order; None without a pipeline."""
    pipeline = getattr(trainer.train_module, "pipeline", None)
    if pipeline is None:
        return None
    stage_ids: list[list[int]] = [[] for _ in range(topology.world_size)]
    dist.all_gather_object(stage_ids, pipeline.stage_ids)
    return stage_ids


def train_and_record(
    cfg: Config,
    run_dir: Path,
    steps: int,
    world_size: int,
    topology: Topology | None = None,
    save_at: tuple[int, ...] = (),
    forget_optimizer_state: bool = False,
    prepare: Callable[[Trainer], Any] | None = None,
) -> dict[str, Any]:
    """Train `steps` steps; return initial and final full weights, losses, grad norms,
    MoE metrics per step (`ExpertLoad.metrics`, empty for a dense model), validation loss,
    the parameter layouts and, under pipeline parallelism, every rank's
    stage ids (full weights on rank 0 only); in one process also "adam": AdamW's betas,
    eps, and per step the learning rate and each parameter's sqrt(v) (adam_weight_bounds).

    The Trainer resumes as `cfg.trainer.resume` says ("start_step" in the result is the step
    it starts from). It checkpoints after each step in `save_at` (and waits for an async
    save before returning). `forget_optimizer_state` clears AdamW's state after resuming:
    the control run of a test that proves the optimizer state was carried over. `prepare`
    is called with the Trainer before the first step."""
    topology = topology or start_topology(cfg, world_size)
    data = synthetic_data(cfg, dp_rank=topology.dp_rank, dp_size=topology.dp_size)
    trainer = Trainer(cfg, run_dir, world_size, data=data, topology=topology)
    if forget_optimizer_state:
        trainer.optimizer.state.clear()
    if prepare is not None:
        prepare(trainer)
    start_step = trainer.step
    initial = _copy(gathered_state_dict(trainer.model_parts, topology))
    losses, grad_norms, moe_metrics = [], [], []
    adam = None if topology.is_distributed else adam_record(trainer.optimizer)
    for _ in range(steps):
        loss, grad_norm = trainer.train_step(trainer.train_batches)
        losses.append(mean_over_dp_and_cp(topology, loss).item())
        grad_norms.append(grad_norm.item())
        moe_metrics.append(trainer.expert_load.metrics())
        if adam is not None:
            record_adam_step(adam, trainer.model_parts[0], trainer.optimizer)
        if trainer.step in save_at:
            trainer.save_checkpoint()
    trainer.checkpointer.wait()
    val_loss = trainer.evaluate()
    final = gathered_state_dict(trainer.model_parts, topology)
    return {
        "start_step": start_step,
        "initial": initial,
        "final": _copy(final),
        "losses": losses,
        "grad_norms": grad_norms,
        "moe_metrics": moe_metrics,
        "val_loss": val_loss,
        # the model's names; under pipeline parallelism each prefixed by its stage's index
        "placements": placements_by_name(trainer.train_module.whole_model
                                         or trainer.model_parts),
        "stage_ids": _stage_ids_of_every_rank(trainer, topology),
        "dp_rank": topology.dp_rank,
        "label": topology.label(),
        "autocast": trainer.precision.name,
        "adam": adam,
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


def _adam_step_ratio_bound(step: int, beta1: float, beta2: float) -> float:
    """C_t: the largest |m_hat| / sqrt(v_hat) AdamW can reach at `step` (1-based), over all
    gradient sequences: by Cauchy-Schwarz on m's and v's exponential sums."""
    ratio = sum((beta1**2 / beta2) ** j for j in range(step))
    return (1 - beta1) / (1 - beta1**step) * math.sqrt((1 - beta2**step) / (1 - beta2) * ratio)


def adam_weight_bounds(reference: dict, noise: float = GRADIENT_NOISE) -> dict[str, torch.Tensor]:
    """Per entry, how far another run's weights may lie from the one-process `reference`'s
    after its AdamW steps from the same start, if the gradients the other run hands Adam
    differ by at most `noise` times the tensor's largest sqrt(v) over the run (a bias: or
    its weight's, if larger; see the notes on LOSS_RTOL):
        sum over steps t of lr_t min(2 C_t, (1 + C_t) D / (sqrt(v_t) + eps)),
    plus 8 ulp of the weight per step for the optimizer's own rounding."""
    adam = reference["adam"]
    assert adam is not None, "the reference must run in one process"
    beta1, beta2 = adam["betas"]
    steps = range(len(adam["lrs"]))
    def largest(name: str) -> float:
        return max(adam["sqrt_v"][t][name].max().item() for t in steps)

    bounds = {}
    for name, final in reference["final"].items():
        if name not in adam["sqrt_v"][0]:
            continue
        scale = largest(name)
        weight = name.removesuffix(".bias") + ".weight"
        if name.endswith(".bias") and weight in adam["sqrt_v"][0]:
            # A bias's gradient sums its layer's output gradients over the tokens, the terms
            # of its weight's gradient: its rounding noise scales with the weight's gradient,
            # not its own (the key bias's is exactly zero: softmax ignores a shift of all
            # of a query's scores).
            scale = max(scale, largest(weight))
        bound = torch.zeros_like(final)
        for t in steps:
            ratio = _adam_step_ratio_bound(t + 1, beta1, beta2)  # the state's step count
            sensitivity = (1 + ratio) * noise * scale / (adam["sqrt_v"][t][name] + adam["eps"])
            bound += adam["lrs"][t] * sensitivity.clamp(max=2 * ratio)
        bounds[name] = bound + len(steps) * 8 * 2**-24 * final.abs()
    return bounds


def weights_against_bounds(final: dict[str, torch.Tensor], reference: dict) -> tuple[float, str]:
    """(the largest ratio of an entry's difference from the reference's final weights to its
    adam_weight_bounds bound, a description of that entry) over the tensors Adam updates."""
    bounds = adam_weight_bounds(reference)
    worst, where = 0.0, "no Adam-updated tensors"
    for name, bound in bounds.items():
        difference = (final[name] - reference["final"][name]).abs()
        ratio = (difference / bound).flatten()
        index = int(ratio.argmax())
        if ratio[index] >= worst:
            worst = ratio[index].item()
            where = (f"{name}: entry {index} differs by {difference.flatten()[index]:.3e}, "
                     f"its Adam bound {bound.flatten()[index]:.3e} ({int((ratio > 1).sum())} "
                     f"of {ratio.numel()} entries out of bound)")
    return worst, where


def assert_weights_match(final: dict[str, torch.Tensor], reference: dict) -> float:
    """Every weight of `final` within adam_weight_bounds(reference) of the reference's final
    weights; tensors Adam does not update (buffers) within WEIGHT_RTOL/WEIGHT_ATOL. Returns
    the largest ratio of a difference to its bound."""
    assert final.keys() == reference["final"].keys()
    for name, want in reference["final"].items():
        if name not in reference["adam"]["sqrt_v"][0]:
            torch.testing.assert_close(final[name], want, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                       msg=lambda m, name=name: f"{name}: {m}")
    worst, where = weights_against_bounds(final, reference)
    assert worst <= 1, where
    return worst
