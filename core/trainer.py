"""The training loop, readable top to bottom.

One optimizer step = `micro_batches` forward/backward passes (gradient accumulation to
`trainer.global_batch_tokens`), global grad-norm clipping, an AdamW step on fp32 master
weights, and the scheduled learning rate. Metrics and evaluation run every few steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from scaleforge.core.config import Config, micro_batches_per_step, validate
from scaleforge.core.flops import peak_flops, training_flops_per_token
from scaleforge.core.lr_schedule import set_lr
from scaleforge.core.metrics import MetricsLogger, peak_memory_gb
from scaleforge.core.optimizer import build_optimizer
from scaleforge.core.precision import build_precision, resolve_device
from scaleforge.data_pipeline.loader import build_loaders
from scaleforge.models import build, count_parameters
from scaleforge.parallel.activation_checkpoint import apply_activation_checkpointing

Batch = tuple[torch.Tensor, torch.Tensor]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed torch's generators; on CPU also force deterministic kernels (bitwise repeatable)."""
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")


class Trainer:
    """Trains `cfg.model` on `cfg.data` in one process, writing everything into `run_dir`."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        world_size: int = 1,
        data: tuple[Iterator[Batch], object] | None = None,
    ):
        """`data` = (training micro-batch iterator, validation loader with `.batches(n)`);
        by default both come from `cfg.data` via `data_pipeline.build_loaders`."""
        validate(cfg, world_size)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), self.run_dir / "config.yaml")
        self.device = resolve_device(cfg.trainer.device)
        self.precision = build_precision(cfg.trainer.precision, self.device)
        self.micro_batches = micro_batches_per_step(cfg)

        if data is None:
            train_loader, val_loader, _, _ = build_loaders(cfg.data, cfg.trainer.micro_batch_size)
            data = (iter(train_loader), val_loader)
        self.train_batches, self.val_loader = data

        seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, self.device)
        self.model = build(cfg.model, device=self.device)
        apply_activation_checkpointing(
            self.model, cfg.trainer.activation_checkpointing, cfg.trainer.checkpoint_every_n_blocks
        )
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device.type)
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.device, cfg.trainer.precision)
        self.step = 0

    def train_step(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `self.micro_batches` micro-batches from `batches`.

        Returns (mean loss, grad norm before clipping) as device tensors (no host sync).
        """
        self.model.train()
        set_lr(self.optimizer, self.step, self.cfg.optim, self.cfg.trainer.max_steps)
        scaler = self.precision.scaler
        total_loss = torch.zeros((), device=self.device)
        for _ in range(self.micro_batches):
            inputs, targets = (t.to(self.device, non_blocking=True) for t in next(batches))
            with self.precision.autocast():
                loss = cross_entropy(self.model(inputs), targets) / self.micro_batches
            (scaler.scale(loss) if scaler else loss).backward()
            total_loss += loss.detach()
        if scaler:
            scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total_loss, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first `trainer.eval_batches` validation micro-batches."""
        self.model.eval()
        losses = []
        for inputs, targets in self.val_loader.batches(self.cfg.trainer.eval_batches):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self.precision.autocast():
                losses.append(cross_entropy(self.model(inputs), targets))
        return torch.stack(losses).mean().item()

    def fit(self, logger: MetricsLogger | None = None) -> dict:
        """Train for `trainer.max_steps` steps; return the last logged record."""
        cfg = self.cfg.trainer
        own_logger = logger is None
        logger = logger or MetricsLogger(
            self.run_dir, self.cfg.logging, asdict(self.cfg), cfg.max_steps
        )
        tokens_per_step = self.cfg.trainer.global_batch_tokens
        logger.message(self._describe())
        record = {"step": 0, "val_loss": self.evaluate()}
        record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
        logger.log(record)

        start = interval_start = time.perf_counter()
        interval_steps = 0
        while self.step < cfg.max_steps:
            loss, grad_norm = self.train_step(self.train_batches)
            interval_steps += 1
            logger.advance()
            is_eval = self.step % cfg.eval_every == 0 or self.step == cfg.max_steps
            if not (self.step % cfg.log_every == 0 or is_eval):
                continue
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            tokens_per_s = interval_steps * tokens_per_step / (now - interval_start)
            record = {
                "step": self.step,
                "loss": loss.item(),
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm.item(),
                "tokens": self.step * tokens_per_step,
                "tokens_per_s": tokens_per_s,
                "tflops": tokens_per_s * self.flops_per_token / 1e12,
                "mfu": (tokens_per_s * self.flops_per_token / self.peak_flops
                        if self.peak_flops else None),
                "memory_gb": peak_memory_gb(self.device),
                "elapsed_s": now - start,
                "eta_s": (now - start) / self.step * (cfg.max_steps - self.step),
            }
            if is_eval:
                record["val_loss"] = self.evaluate()
                record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
            logger.log(record)
            interval_start, interval_steps = time.perf_counter(), 0
        if cfg.save_final_weights:
            path = self.run_dir / "final_model.pt"
            torch.save(self.model.state_dict(), path)
            logger.message(f"final weights: {path}")
        if own_logger:
            logger.close()
        return record

    def _describe(self) -> str:
        cfg = self.cfg
        params = count_parameters(self.model)
        non_embedding = count_parameters(self.model, embeddings=False)
        return (
            f"model {cfg.model.name} ({cfg.model.family}): {params / 1e6:.2f}M parameters "
            f"({non_embedding / 1e6:.2f}M non-embedding) | device {self.device} | precision "
            f"{cfg.trainer.precision} | {cfg.trainer.global_batch_tokens:,} tokens/step = "
            f"{self.micro_batches} micro-batches x {cfg.trainer.micro_batch_size} x "
            f"{cfg.data.seq_len} | {self.flops_per_token / 1e6:.1f} MFLOP/token | "
            f"run dir {self.run_dir}"
        )
