"""Throughput of the steps between two log lines: tokens/s, FLOP/s per GPU and for the
cluster, MFU in two FLOP conventions (and against the float8 peak), and peak memory (the
largest of any rank)."""

from __future__ import annotations

import time

import torch

from scaleforge.core.flops import fp8_peak_flops, peak_flops, training_flops_per_token
from scaleforge.core.metrics import peak_memory_gb, peak_reserved_memory_gb, reset_peak_memory
from scaleforge.models.config import TransformerConfig
from scaleforge.parallel.collectives import max_over_world
from scaleforge.parallel.topology import Topology


class ThroughputMeter:
    """Counts steps since the last `restart` and turns them into the metrics record's speed
    and memory fields (`read`). `tokens_per_step` is the global batch (every data-parallel
    replica); the cluster's FLOP/s are shared out over all `topology.world_size` GPUs."""

    def __init__(self, model: TransformerConfig, seq_len: int, tokens_per_step: int,
                 topology: Topology, precision: str):
        self.flops_per_token = training_flops_per_token(model, seq_len, causal=True)
        self.flops_per_token_full_attention = training_flops_per_token(model, seq_len,
                                                                       causal=False)
        self.peak_flops = peak_flops(topology.device, precision)
        self.fp8_peak_flops = fp8_peak_flops(topology.device)
        self.tokens_per_step = tokens_per_step
        self.topology = topology
        self.restart()

    def restart(self) -> None:
        """Start a new interval now (after start-up, and after each log line): the clock, the
        step count and, on CUDA, the device's peak-memory counters start again."""
        reset_peak_memory(self.topology.device)
        self.started = time.perf_counter()
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def read(self) -> dict[str, float | None]:
        """The interval's fields; waits for the device's queued work first. Collective: every
        rank calls it at the same steps (one all-reduce of two floats, for the memory).

        tokens_per_s: tokens trained per second by the whole run (every replica).
        tflops_total: model TFLOP/s of the whole cluster (tokens_per_s x FLOPs per token,
            causal attention counted: `training_flops_per_token(causal=True)`).
        tflops: TFLOP/s per GPU, tflops_total / world size.
        mfu: tflops over one GPU's dense peak (`flops.peak_flops`), i.e. cluster FLOP/s /
            (world size x peak); None where the peak is unknown (CPU, GPUs not in the table).
        mfu_fp8: tflops over one GPU's dense float8 peak (`flops.fp8_peak_flops`): how far a
            trainer.fp8 run is from what float8 tensor cores could do; `mfu` stays against the
            bf16 (or the run's precision's) peak, the convention torchtitan's fp8 figures
            use too. None without a float8 peak (CPU, A100).
        mfu_full_attention: the same with attention counted over every key, as torchtitan,
            Megatron and PaLM count it.
        memory_gb: the largest peak over ranks since `restart`, in GiB: tensors allocated
            on CUDA, the process's peak RSS on CPU (since it started: RSS cannot be reset).
        memory_reserved_gb: the largest peak over ranks of CUDA's caching allocator (tensors
            and its cache), in GiB; None on CPU.
        """
        device = self.topology.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tokens_per_s = self.steps * self.tokens_per_step / (time.perf_counter() - self.started)
        cluster_flops = tokens_per_s * self.flops_per_token
        gpus = self.topology.world_size
        peak = self.peak_flops
        reserved = peak_reserved_memory_gb(device)
        memory = max_over_world(
            self.topology,
            torch.tensor([peak_memory_gb(device), reserved or 0.0], dtype=torch.float64,
                         device=device)
        ).tolist()
        return {
            "tokens_per_s": tokens_per_s,
            "tflops": cluster_flops / gpus / 1e12,
            "tflops_total": cluster_flops / 1e12,
            "mfu": cluster_flops / (gpus * peak) if peak else None,
            "mfu_fp8": (cluster_flops / (gpus * self.fp8_peak_flops) if self.fp8_peak_flops
                        else None),
            "mfu_full_attention": (tokens_per_s * self.flops_per_token_full_attention
                                   / (gpus * peak) if peak else None),
            "memory_gb": memory[0],
            "memory_reserved_gb": memory[1] if reserved is not None else None,
        }

    def describe(self) -> str:
        """The FLOP convention of `mfu` and both counts per token, for the start-up line."""
        return (
            f"MFU counts causal attention: {self.flops_per_token / 1e6:,.2f} MFLOP/token "
            f"(mfu_full_attention: {self.flops_per_token_full_attention / 1e6:,.2f} MFLOP/token, "
            "every key counted as torchtitan, Megatron and PaLM do)"
        )
