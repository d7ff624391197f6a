"""Throughput of the steps between two log lines: tokens/s, FLOP/s, MFU and peak memory."""

from __future__ import annotations

import time

import torch

from scaleforge.core.flops import peak_flops, training_flops_per_token
from scaleforge.core.metrics import peak_memory_gb
from scaleforge.models.config import TransformerConfig


class ThroughputMeter:
    """Counts steps since the last `read` and turns them into the metrics record's speed
    fields. `tokens_per_step` is the global batch (every data-parallel replica)."""

    def __init__(self, model: TransformerConfig, seq_len: int, tokens_per_step: int,
                 device: torch.device, precision: str):
        self.flops_per_token = training_flops_per_token(model, seq_len)
        self.peak_flops = peak_flops(device, precision)
        self.tokens_per_step = tokens_per_step
        self.device = device
        self.restart()

    def restart(self) -> None:
        """Start a new interval now (after start-up, and after each `read` and evaluation)."""
        self.started = time.perf_counter()
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def read(self) -> dict[str, float | None]:
        """tokens_per_s, tflops, mfu (None where the device's peak is unknown) and
        memory_gb over the interval; waits for the device's queued work first."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        tokens_per_s = self.steps * self.tokens_per_step / (time.perf_counter() - self.started)
        flops = tokens_per_s * self.flops_per_token
        return {
            "tokens_per_s": tokens_per_s,
            "tflops": flops / 1e12,
            "mfu": flops / self.peak_flops if self.peak_flops else None,
            "memory_gb": peak_memory_gb(self.device),
        }
