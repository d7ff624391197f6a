"""The experts of one MoE layer as a loop over experts against `torch._grouped_mm`.

    python -m scaleforge.bench.moe_gemm [--tokens 4096 --experts 8 --top-k 2 --d 128
                                         --hidden 192 --rounds 7]

Routes `tokens` random tokens to `experts` experts (top_k each) through the real MoE layer
(models/moe.py) with `model.moe.grouped_mm` = loop, then = grouped, in alternating rounds so
machine noise hits both alike; medians compared. Forward (no grad) and forward + backward,
in fp32 and bf16; where the grouped kernel fails (a device or dtype it lacks) the run says
so. The outputs of the two are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from scaleforge.models import build
from scaleforge.models.moe import MoE


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def run(module: MoE, x: torch.Tensor, mode: str, backward: bool) -> torch.Tensor:
    module.experts.grouped_mm = mode
    if not backward:
        with torch.no_grad():
            return module(x)
    out = module(x)
    out.float().square().mean().backward()
    return out.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    cfg = dict(name="bench", n_layers=1, d_model=args.d, n_heads=4, vocab_size=256,
               max_seq_len=args.tokens, moe={"num_experts": args.experts, "top_k": args.top_k,
                                             "expert_hidden": args.hidden})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | {args.tokens} tokens, "
          f"{args.experts} experts top {args.top_k}, d {args.d}, expert width {args.hidden}")
    for dtype in (torch.float32, torch.bfloat16):
        module = build(cfg, seed=0).to(dtype).layers["0"].feed_forward
        assert isinstance(module, MoE)
        x = torch.randn(1, args.tokens, args.d, dtype=dtype)
        for backward in (False, True):
            label = f"{str(dtype).removeprefix('torch.')} {'fwd+bwd' if backward else 'fwd'}"
            try:
                grouped = run(module, x, "grouped", backward)
            except RuntimeError as error:
                print(f"{label}: grouped_mm fails on {x.device.type}: {str(error)[:80]}")
                continue
            loop = run(module, x, "loop", backward)
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(grouped, loop, rtol=tolerance, atol=tolerance)
            times: dict[str, list[float]] = {"loop": [], "grouped": []}
            for _ in range(args.rounds):
                for mode in times:
                    times[mode].append(timed(partial(run, module, x, mode, backward)))
            loop_s, grouped_s = (statistics.median(times[m]) for m in ("loop", "grouped"))
            print(f"{label}: loop {loop_s * 1e3:.2f} ms, grouped_mm {grouped_s * 1e3:.2f} ms, "
                  f"grouped / loop {grouped_s / loop_s:.2f}")


if __name__ == "__main__":
    main()
