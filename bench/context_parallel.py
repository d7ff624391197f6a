"""Context parallelism on CPU: activations per rank and step time at a long sequence,
cp=2 against one process.

    python -m scaleforge.bench.context_parallel [--steps 5] [--cp 2] [hydra overrides...]

One sequence of `data.seq_len` (4,096) tokens per step, llama_tiny in fp32; cp=2 runs two
gloo processes with one thread each, the single process one thread. Prints, for each, the
bytes of activations a rank keeps for backward (`parallel_layouts.saved_activation_bytes`:
the distinct tensors autograd saves, parameters excluded) and the median step time, with
the ratios to one process.
"""

from __future__ import annotations

import argparse

import torch

from scaleforge.bench.parallel_layouts import time_layout

WARMUP_STEPS = 1
LONG_SEQUENCE = [
    "data.seq_len=4096", "model.max_seq_len=4096", "trainer.micro_batch_size=1",
    "trainer.global_batch_tokens=4096",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.seq_len=8192")
    args = parser.parse_args()
    print(f"torch {torch.__version__} | {' '.join(LONG_SEQUENCE + args.overrides)} | "
          f"{args.steps} timed steps after {WARMUP_STEPS}, median")
    baseline_seconds, baseline_bytes, _ = time_layout(LONG_SEQUENCE + args.overrides,
                                                      args.steps, WARMUP_STEPS)
    print(f"cp=1: {baseline_bytes / 2**20:8.1f} MiB activations per rank | "
          f"{baseline_seconds * 1e3:8.1f} ms/step", flush=True)
    seconds, activations, _ = time_layout(
        LONG_SEQUENCE + args.overrides + [f"parallel.cp={args.cp}"], args.steps, WARMUP_STEPS)
    print(f"cp={args.cp}: {activations / 2**20:8.1f} MiB activations per rank "
          f"({activations / baseline_bytes:.2f}x) | {seconds * 1e3:8.1f} ms/step "
          f"({seconds / baseline_seconds:.2f}x one process's step time)")


if __name__ == "__main__":
    main()
