"""Measured vs theoretical pipeline bubble for every schedule, on CPU with gloo.

    python -m scaleforge.bench.pipeline_bubble [--pp 2 4] [--micro-batches 8] [--steps 3]

For each pp size one job of pp processes (one thread each) runs every schedule on a small
Llama (2 layers per rank). Each PipelineStage's compute calls (forward_one_chunk,
backward_one_chunk, backward_weight_one_chunk) and the loss are timed with perf_counter;
a rank's idle fraction is 1 - compute / wall time of the step (from barrier to barrier),
so it counts waiting for neighbours and communication. Prints one markdown row per
(pp, schedule): measured idle (mean and max over ranks), theoretical bubble, step time and
the measured F : B : W split (the zero-bubble formulas assume F = B = W).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from typing import ParamSpec, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scaleforge.data_pipeline.batch import Batch
from scaleforge.models import build
from scaleforge.models.config import TransformerConfig
from scaleforge.models.loss import cross_entropy
from scaleforge.parallel.pipeline import Pipeline, build_pipeline, pipeline_step
from scaleforge.parallel.pipeline_schedules import (
    SCHEDULES,
    available_schedules,
    theoretical_bubble_fraction,
)
from scaleforge.torch_compat import wrap_loss_computation

Params = ParamSpec("Params")
Result = TypeVar("Result")
SEQ_LEN = 128
MICRO_BATCH_SIZE = 4
TIMED_CALLS = {
    "forward_one_chunk": "F",
    "backward_one_chunk": "B",
    "backward_weight_one_chunk": "W",
}


def _model_cfg(pp: int) -> TransformerConfig:
    return TransformerConfig(name="bubble_bench", n_layers=2 * pp, d_model=256, n_heads=4,
                             ffn_hidden=1024, vocab_size=512, max_seq_len=SEQ_LEN)


def _timed(
    fn: Callable[Params, Result], seconds: dict[str, float], key: str
) -> Callable[Params, Result]:
    def wrapper(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[key] += time.perf_counter() - start
        return result

    return wrapper


def _instrument(pipe: Pipeline) -> dict[str, float]:
    """Accumulate compute seconds per kind (F, B, W, loss) of this rank's stages."""
    seconds: dict[str, float] = defaultdict(float)
    for stage in pipe.stages:
        for method, key in TIMED_CALLS.items():
            setattr(stage, method, _timed(getattr(stage, method), seconds, key))
    schedule = pipe.schedule
    wrap_loss_computation(schedule, lambda compute: _timed(compute, seconds, "loss"))
    return seconds


def _measure(schedule: str, pp: int, micro_batches: int, steps: int) -> dict | None:
    """Run `steps` timed steps (after 2 warm-up steps); rank 0 returns the gathered figures."""
    stages_per_rank = 2 if SCHEDULES[schedule].multi_stage else 1
    torch.manual_seed(0)
    model = build(_model_cfg(pp))
    world = dist.group.WORLD
    assert world is not None  # _worker initialised the process group
    pipe = build_pipeline(model, world, schedule, stages_per_rank, micro_batches,
                          cross_entropy, "cpu")
    generator = torch.Generator().manual_seed(1)

    def draw() -> torch.Tensor:
        return torch.randint(0, 512, (MICRO_BATCH_SIZE, SEQ_LEN), generator=generator)

    batches = [Batch(draw(), draw()) for _ in range(micro_batches)]  # no document ids
    seconds = _instrument(pipe)
    walls = []
    for step in range(2 + steps):
        if step == 2:
            seconds.clear()
        dist.barrier()
        start = time.perf_counter()
        pipeline_step(pipe, batches)
        dist.barrier()
        if step >= 2:
            walls.append(time.perf_counter() - start)
        for param in pipe.parameters():
            param.grad = None
    wall = sum(walls)
    mine = {"idle": 1 - sum(seconds.values()) / wall, **{k: seconds[k] for k in "FBW"}}
    everyone: list[dict] = [{} for _ in range(pp)]
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() != 0:
        return None
    idles = [r["idle"] for r in everyone]
    split = {k: sum(r[k] for r in everyone) for k in "FBW"}
    return {
        "schedule": schedule, "pp": pp, "v": stages_per_rank, "m": micro_batches,
        "idle_mean": statistics.mean(idles), "idle_max": max(idles),
        "theory": theoretical_bubble_fraction(schedule, pp, micro_batches, stages_per_rank),
        "step_ms": 1000 * statistics.median(walls),
        "fbw": f"{split['F'] / split['F']:.1f} : {split['B'] / split['F']:.1f} : "
               f"{split['W'] / split['F']:.1f}",
    }


def _worker(rank: int, pp: int, init_file: str, micro_batches: int, steps: int,
            out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=pp, timeout=timedelta(seconds=300))
    try:
        rows = [_measure(s, pp, micro_batches, steps) for s in available_schedules()]
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    print(f"torch {torch.__version__}, gloo, {os.cpu_count()} CPUs, one thread per rank; "
          f"llama d_model=256, 2 layers per rank, micro-batch {MICRO_BATCH_SIZE} x {SEQ_LEN}")
    print("| pp | schedule | stages/rank | micro-batches | measured idle mean (max) | "
          "theoretical bubble | step ms | F : B : W |")
    print("|---|---|---|---|---|---|---|---|")
    for pp in args.pp:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.pt")
            mp.spawn(_worker, args=(pp, os.path.join(tmp, "init"), args.micro_batches,
                                    args.steps, out), nprocs=pp, join=True)
            for row in torch.load(out):
                print(f"| {row['pp']} | {row['schedule']} | {row['v']} | {row['m']} | "
                      f"{row['idle_mean']:.2f} ({row['idle_max']:.2f}) | {row['theory']:.2f} | "
                      f"{row['step_ms']:.0f} | {row['fbw']} |", flush=True)


if __name__ == "__main__":
    main()
