"""What the fault callbacks cost per training step: the demo's step with and without the
hang watchdog's heartbeat (its thread running), the straggler timing and the (inert) fault
drills, in one process, in alternating rounds.

    python -m scaleforge.bench.fault_overhead [--steps 10 --rounds 7] [hydra overrides...]

Both variants run the same Trainer on one fixed batch; a step is `train_step` and every
callback's `post_step`, and every `trainer.log_every`-th step also their `metrics` and
`post_log` (as `fit` calls them; the straggler's all-gather is a no-op in one process, so
its cost at several ranks, one gather of 2 floats per rank per log interval, is not in this
figure). Prints the median seconds per step of each and the ratio with / without, and,
since that ratio is within a loaded machine's noise, the hooks' own time: the fault
callbacks' per-step hooks called `HOOK_CALLS` times in a row, in microseconds per step and
as a fraction of the step measured without them. Then one snapshot
(`checkpoint.snapshot_every`: a synchronous checkpoint into node-local storage and the copy
to the peer's folder) is timed `--snapshots` times: its median, and its share of the step
time at snapshot_every=2 and 10.
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

from scaleforge.bench.train_step import seconds_per_step
from scaleforge.core.callbacks import Callback
from scaleforge.core.callbacks.faults import FaultInjectionCallback
from scaleforge.core.callbacks.hang_watchdog import HangWatchdogCallback
from scaleforge.core.callbacks.straggler import StragglerCallback
from scaleforge.core.checkpoint.snapshots import copy_to_peer
from scaleforge.core.config import compose, to_config
from scaleforge.core.metrics import MetricsLogger
from scaleforge.core.trainer import Trainer
from scaleforge.data_pipeline.batch import Batch

FAULT_CALLBACKS = (StragglerCallback, HangWatchdogCallback, FaultInjectionCallback)
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


def snapshot_seconds(trainer: Trainer, times: int) -> float:
    """Median seconds of one snapshot of `trainer`'s state (save, then the peer copy)."""
    checkpointer = trainer.snapshots.checkpointer
    assert checkpointer is not None  # run() turns snapshots on
    seconds = []
    for index in range(times):
        start = time.perf_counter()
        checkpointer.save(trainer.step + index)  # a new step folder each time, 2 kept
        copy_to_peer(trainer.snapshots.root, trainer.step + index, 0, 1)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def run(overrides: list[str], steps: int, rounds: int, warmup: int, snapshots: int) -> float:
    cfg = to_config(compose(["+experiment=demo", "logging.wandb=disabled",
                             "logging.progress_bar=false", *overrides]))
    cfg.trainer.global_batch_tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
    cfg.trainer.max_steps = 10**6
    cfg.data.vocab_size = cfg.data.vocab_size or cfg.model.vocab_rows
    run_dir = Path(tempfile.mkdtemp(prefix="sf-bench-faults-"))
    cfg.checkpoint.snapshot_every = 10**6  # builds the snapshot checkpointer; timed below
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
    try:
        for step in variants.values():
            for _ in range(warmup):
                step()
        for _ in range(rounds):
            for name, step in variants.items():
                times[name].append(seconds_per_step(step, steps, trainer.device))
        faults: list[Callback] = [c for c in with_faults if isinstance(c, FAULT_CALLBACKS)]
        hooks = hook_seconds_per_step(trainer, faults, logger)
    finally:
        for callback in with_faults:
            callback.post_train(trainer)
    watchdog_on = any(isinstance(c, HangWatchdogCallback) and c.timeout_s > 0
                      for c in with_faults)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"model {cfg.model.name} | batch {cfg.trainer.micro_batch_size} x {cfg.data.seq_len}"
          f" | {steps} steps x {rounds} rounds | hang watchdog "
          f"{'on' if watchdog_on else 'off'}, log_every {cfg.trainer.log_every}")
    for name, seconds in medians.items():
        print(f"{name:>8} fault callbacks: {seconds * 1e3:8.2f} ms/step "
              f"(rounds {', '.join(f'{t * 1e3:.1f}' for t in times[name])})")
    ratio = medians["with"] / medians["without"]
    print(f"ratio with / without: {ratio:.4f}")
    print(f"the fault callbacks' hooks alone: {hooks * 1e6:.1f} us/step = "
          f"{hooks / medians['without']:.5%} of the step without them")
    if snapshots:
        snapshot = snapshot_seconds(trainer, snapshots)
        print(f"one snapshot (save + peer copy, median of {snapshots}): {snapshot * 1e3:.1f} ms"
              f" = {snapshot / (2 * medians['without']):.1%} of the step time at "
              f"snapshot_every=2, {snapshot / (10 * medians['without']):.1%} at 10")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--snapshots", type=int, default=5, help="snapshots timed (0: none)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    run(args.overrides, args.steps, args.rounds, args.warmup, args.snapshots)


if __name__ == "__main__":
    main()
