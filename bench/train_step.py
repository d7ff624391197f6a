"""Time ScaleForge training steps against a plain PyTorch loop on the same model and batch.

    python -m scaleforge.bench.train_step [--steps 10 --rounds 5] [hydra overrides...]
    python -m scaleforge.bench.train_step model=gpt2_125m trainer.precision=bf16 \
        trainer.micro_batch_size=8 data.seq_len=1024

The baseline is written here in nanoGPT's style: forward, cross-entropy, backward, clip,
AdamW (fused on CUDA, as nanoGPT; torch's default kernel elsewhere), zero_grad, the whole
model under torch.compile when `trainer.compile` is on. Both run the same initial weights on
one fixed batch already on the device, timed in alternating rounds so machine noise hits
both alike; the medians are compared. On a GPU the defaults are nanoGPT's GPT-2 124M setup:
vocabulary padded to 50304 (a multiple of 64, for the tensor cores), bf16, compile on, and
default (nondeterministic) kernels. Prints tokens/s, achieved FLOP/s, MFU where the
device's peak is known, peak memory, and the ratio ours / baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge.core.config import compose, to_config
from scaleforge.core.flops import peak_flops, training_flops_per_token
from scaleforge.core.metrics import peak_memory_gb
from scaleforge.core.trainer import Trainer
from scaleforge.data_pipeline.batch import Batch
from scaleforge.models import build, count_parameters
from scaleforge.parallel.run_setup import resolve_device


def _default_overrides() -> list[str]:
    if torch.cuda.is_available():
        return ["model=gpt2_125m", "model.vocab_size=50304", "trainer.precision=bf16",
                "trainer.micro_batch_size=8", "data.seq_len=1024", "trainer.compile=true",
                "trainer.deterministic=false"]
    return ["model=llama_tiny", "trainer.precision=fp32", "trainer.micro_batch_size=16",
            "data.seq_len=256"]


def baseline_step_fn(model: nn.Module, batch: Batch, precision: str,
                     lr: float, grad_clip: float) -> Callable:
    """A nanoGPT-style training step on `model` for one fixed `batch`."""
    device_type = batch.inputs.device.type
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.1, fused=device_type == "cuda" or None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else (
        contextlib.nullcontext)
    scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None
    inputs, targets = batch.inputs, batch.targets

    def step() -> None:
        with autocast():
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        if scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def seconds_per_step(step: Callable, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def warm_up_and_measure(make_step: Callable, device: torch.device, warmup: int) -> tuple:
    """Build a step with `make_step`, warm it up and return (step, its peak memory GiB)."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return step, (torch.cuda.max_memory_allocated(device) - before) / 2**30
    return step, peak_memory_gb(device)


def run(overrides: list[str], steps: int, rounds: int, warmup: int) -> dict:
    cfg = to_config(compose(_default_overrides() + overrides + ["logging.wandb=disabled"]))
    cfg.trainer.global_batch_tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
    cfg.data.vocab_size = min(cfg.data.vocab_size or cfg.model.vocab_rows, cfg.model.vocab_rows)
    generator = torch.Generator().manual_seed(0)
    shape = (cfg.trainer.micro_batch_size, cfg.data.seq_len + 1)
    window = torch.randint(cfg.model.vocab_rows, shape, generator=generator)
    batch_cpu = Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous())

    run_dir = Path(tempfile.mkdtemp(prefix="sf-bench-"))
    holder = {}
    device = resolve_device(cfg.trainer.device)
    # Both sides step on the same batch, already on the device (no copy timed on either).
    batch = batch_cpu.to(device)

    def make_ours() -> Callable:
        trainer = Trainer(cfg, run_dir, data=(itertools.repeat(batch), None))
        holder["trainer"] = trainer
        return lambda: trainer.train_step(trainer.train_batches)

    ours, ours_memory = warm_up_and_measure(make_ours, device, warmup)
    trainer = holder["trainer"]

    def make_baseline() -> Callable:
        torch.manual_seed(cfg.trainer.seed)
        model = build(cfg.model, device=device)
        if cfg.trainer.compile:
            model.compile()  # the whole model, in place (nanoGPT compiles the whole model)
        return baseline_step_fn(model, batch, cfg.trainer.precision, cfg.optim.lr,
                                cfg.optim.grad_clip)

    baseline, baseline_memory = warm_up_and_measure(make_baseline, device, warmup)
    ours_times, baseline_times = [], []
    for _ in range(rounds):
        ours_times.append(seconds_per_step(ours, steps, device))
        baseline_times.append(seconds_per_step(baseline, steps, device))

    tokens_per_step = cfg.trainer.micro_batch_size * cfg.data.seq_len
    flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops(device, cfg.trainer.precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} ({torch.get_num_threads()} threads) | torch {torch.__version__}")
    params = count_parameters(trainer.model_parts)
    print(f"model: {cfg.model.name}, {params / 1e6:.2f}M parameters | "
          f"precision {cfg.trainer.precision} | batch {cfg.trainer.micro_batch_size} x "
          f"{cfg.data.seq_len} = {tokens_per_step:,} tokens | {steps} steps x {rounds} rounds")
    results = {}
    for label, times, memory in (("scaleforge", ours_times, ours_memory),
                                 ("baseline", baseline_times, baseline_memory)):
        seconds = statistics.median(times)
        tokens_per_s = tokens_per_step / seconds
        flops = tokens_per_s * flops_per_token
        mfu = f" | MFU {flops / peak:.1%}" if peak else ""
        memory_label = "peak step memory" if device.type == "cuda" else "process peak RSS"
        print(f"{label:>10}: {seconds * 1e3:8.1f} ms/step | {tokens_per_s:,.0f} tokens/s | "
              f"{flops / 1e12:.3f} TFLOP/s{mfu} | {memory_label} {memory:.2f} GiB")
        results[label] = tokens_per_s
    results["ratio"] = results["scaleforge"] / results["baseline"]
    print(f"ratio scaleforge / baseline (tokens/s): {results['ratio']:.3f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=gpt2_125m")
    args = parser.parse_args()
    run(args.overrides, args.steps, args.rounds, args.warmup)


if __name__ == "__main__":
    main()
