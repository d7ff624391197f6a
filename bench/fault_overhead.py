"""What the fault callbacks cost per training step: the demo's step with and without the
hang watchdog's heartbeat (its thread running), the straggler timing, the (inert) fault
drills and snapshots every `--snapshot-every` steps, in one process, in alternating rounds.

    python -m scaleforge.bench.fault_overhead [--steps 10 --rounds 7 --snapshot-every 2]
        [hydra overrides...]

Both variants run the same Trainer on one fixed batch; a step is `train_step` and every
callback's `post_step`, and every `trainer.log_every`-th step also their `metrics` and
`post_log` (as `fit` calls them; the straggler's all-gather is a no-op in one process, so
its cost at several ranks, one gather of a few floats per rank per log interval, is not in
this figure). A round with them ends by waiting for its last snapshot's background write, so
no write spills into the next round. Prints the median seconds per step of each and the
ratio with / without, of the medians and the median of each round's ratio to the round
without them just before it (the same machine load), and the ratio of the medians of the
process's CPU time per step (the background writes' included; less disturbed by other
jobs than wall time on a loaded machine). Then the parts: the fault callbacks' per-step
hooks called `HOOK_CALLS` times in a row (microseconds per step), and for
snapshots (`checkpoint.snapshot_every`: the state copied to host memory on the training
thread, then written into node-local storage and copied to the peer's folder in a
background thread) the copy's time on the training thread and the background write's,
each the median over `--snapshots` snapshots, as a share of the step time at every 2 and
every 10 steps; the copy alone is what a step pays when the write overlaps it on an idle
core.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scaleforge.core.callbacks import Callback
from scaleforge.core.callbacks.faults import FaultInjectionCallback
from scaleforge.core.callbacks.hang_watchdog import HangWatchdogCallback
from scaleforge.core.callbacks.snapshot import SnapshotCallback
from scaleforge.core.callbacks.straggler import StragglerCallback
from scaleforge.core.config import compose, to_config
from scaleforge.core.metrics import MetricsLogger
from scaleforge.core.trainer import Trainer
from scaleforge.data_pipeline.batch import Batch

FAULT_CALLBACKS = (StragglerCallback, HangWatchdogCallback, FaultInjectionCallback,
                   SnapshotCallback)
HOOK_CALLS = 20000


def hook_seconds_per_step(trainer: Trainer, callbacks: list[Callback],
                          logger: MetricsLogger) -> float:
    """Seconds per step of `callbacks`' per-step hooks alone (pre_step, post_optim_step,
    post_step; the step counter left where it was)."""
    start = time.perf_counter()
    for _ in range(HOOK_CALLS):
        for callback in callbacks:
            callback.pre_step(trainer)
        for callback in callbacks:
            callback.post_optim_step(trainer)
        for callback in callbacks:
            callback.post_step(trainer, logger)
    return (time.perf_counter() - start) / HOOK_CALLS


def _loop_step(trainer: Trainer, callbacks: list[Callback], logger: MetricsLogger) -> Callable:
    """One step of `fit`'s loop with `callbacks` as the trainer's."""
    log_every = trainer.cfg.trainer.log_every

    def step() -> None:
        trainer.callbacks = callbacks
        trainer.train_step(trainer.train_batches)
        for callback in callbacks:
            callback.post_step(trainer, logger)
        if trainer.step % log_every == 0:
            for callback in callbacks:
                callback.metrics(trainer)
            for callback in callbacks:
                callback.post_log(trainer)

    return step


def snapshot_seconds(trainer: Trainer, times: int) -> tuple[float, float]:
    """Median seconds of (the copy to host memory on the training thread, the background
    write and peer copy) of one snapshot of `trainer`'s state."""
    writer = trainer.snapshots.writer
    assert writer is not None  # run() turns snapshots on
    staged, written = [], []
    for index in range(times):
        start = time.perf_counter()
        writer.start(10**7 + index)  # a new step folder each time, 2 kept
        started = time.perf_counter()
        writer.wait()
        staged.append(started - start)
        written.append(time.perf_counter() - started)
    return statistics.median(staged), statistics.median(written)


def _round(step: Callable, steps: int, trainer: Trainer, snapshots: bool
           ) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process, background threads included) per
    step of `steps` steps; with `snapshots`, until the last snapshot's write is done."""
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    writer = trainer.snapshots.writer
    if snapshots and writer is not None:
        writer.wait()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return ((time.perf_counter() - start) / steps,
            (time.process_time() - cpu_start) / steps)


def run(overrides: list[str], steps: int, rounds: int, warmup: int, snapshots: int,
        snapshot_every: int) -> float:
    cfg = to_config(compose(["+experiment=demo", "logging.wandb=disabled",
                             "logging.progress_bar=false", *overrides]))
    cfg.trainer.global_batch_tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
    cfg.trainer.max_steps = 10**6
    cfg.data.vocab_size = cfg.data.vocab_size or cfg.model.vocab_rows
    run_dir = Path(tempfile.mkdtemp(prefix="sf-bench-faults-"))
    cfg.checkpoint.snapshot_every = snapshot_every
    cfg.checkpoint.snapshot_dir = str(run_dir / "snapshots")
    generator = torch.Generator().manual_seed(0)
    window = torch.randint(cfg.model.vocab_rows, (cfg.trainer.micro_batch_size,
                                                  cfg.data.seq_len + 1), generator=generator)
    batch = Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous())
    trainer = Trainer(cfg, run_dir, data=(itertools.repeat(batch), None))
    logger = MetricsLogger(run_dir, cfg.logging, {}, 0, is_rank0=False)
    with_faults = list(trainer.callbacks)
    without = [c for c in with_faults if not isinstance(c, FAULT_CALLBACKS)]
    for callback in with_faults:
        callback.pre_train(trainer)  # the watchdog's thread runs in both variants' rounds
    variants = {"without": _loop_step(trainer, without, logger),
                "with": _loop_step(trainer, with_faults, logger)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for name, step in variants.items():
            _round(step, warmup, trainer, name == "with")
        for _ in range(rounds):
            for name, step in variants.items():
                wall, cpu_s = _round(step, steps, trainer, name == "with")
                times[name].append(wall)
                cpu[name].append(cpu_s)
        faults: list[Callback] = [c for c in with_faults if isinstance(c, FAULT_CALLBACKS)
                                  and not isinstance(c, SnapshotCallback)]
        hooks = hook_seconds_per_step(trainer, faults, logger)
    finally:
        for callback in with_faults:
            callback.post_train(trainer)
    watchdog_on = any(isinstance(c, HangWatchdogCallback) and c.timeout_s > 0
                      for c in with_faults)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"model {cfg.model.name} | batch {cfg.trainer.micro_batch_size} x {cfg.data.seq_len}"
          f" | {steps} steps x {rounds} rounds | hang watchdog "
          f"{'on' if watchdog_on else 'off'}, log_every {cfg.trainer.log_every}, "
          f"snapshots every {snapshot_every} steps")
    for name, seconds in medians.items():
        print(f"{name:>8} fault callbacks: {seconds * 1e3:8.2f} ms/step "
              f"(rounds {', '.join(f'{t * 1e3:.1f}' for t in times[name])})")
    ratio = medians["with"] / medians["without"]
    # each round with them against the round without them just before it (the same load)
    pairs = [w / wo for w, wo in zip(times["with"], times["without"], strict=True)]
    print(f"ratio with / without: {ratio:.4f} (medians); {statistics.median(pairs):.4f} "
          f"(median of the rounds' ratios, {min(pairs):.3f} to {max(pairs):.3f})")
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    print(f"CPU time of the process per step (the snapshots' background writes included): "
          f"{cpu_medians['without'] * 1e3:.1f} ms without, {cpu_medians['with'] * 1e3:.1f} ms "
          f"with, ratio {cpu_medians['with'] / cpu_medians['without']:.4f}")
    print(f"the fault callbacks' hooks alone (snapshots aside): {hooks * 1e6:.1f} us/step = "
          f"{hooks / medians['without']:.5%} of the step without them")
    if snapshots:
        staged, written = snapshot_seconds(trainer, snapshots)
        step_s = medians["without"]
        print(f"one snapshot (median of {snapshots}): copy to host memory {staged * 1e3:.1f} ms"
              f" on the training thread = {staged / (2 * step_s):.2%} of the step time at "
              f"snapshot_every=2, {staged / (10 * step_s):.2%} at 10; background write + "
              f"peer copy {written * 1e3:.1f} ms ({written / step_s:.2f} steps)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--snapshots", type=int, default=5,
                        help="snapshots timed alone afterwards (0: none)")
    parser.add_argument("--snapshot-every", type=int, default=2,
                        help="checkpoint.snapshot_every in the rounds with the fault callbacks")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    run(args.overrides, args.steps, args.rounds, args.warmup, args.snapshots,
        args.snapshot_every)


if __name__ == "__main__":
    main()
