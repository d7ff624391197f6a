"""Time checkpoint saves (sync and async) and loads of a model with its AdamW state.

    python -m scaleforge.bench.checkpoint [--repeats 3] [hydra overrides...]
    python -m scaleforge.bench.checkpoint model=llama_small

One process. The trainer takes one optimizer step first, so AdamW's moments exist and the
checkpoint holds what a real one does (weights, two moments, step counts, loader and RNG
state). Each repetition saves the current step synchronously, then (after another training
step) asynchronously, then loads that checkpoint back (from the page cache: it was just
written). For the async save it reports the time the training loop is blocked (until
save() returns: the state is staged in memory) and the time until the checkpoint is
complete (written and renamed). Prints medians, bytes on disk and the ratios to the sync
save of the same run.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from scaleforge.core.checkpoint.paths import is_complete, step_dir
from scaleforge.core.config import compose, to_config
from scaleforge.core.trainer import Trainer
from scaleforge.data_pipeline.batch import Batch
from scaleforge.models import count_parameters

DEFAULTS = ["model=gpt2_125m", "trainer.precision=fp32", "trainer.device=cpu",
            "trainer.micro_batch_size=1", "data.seq_len=64", "logging.wandb=disabled",
            "logging.progress_bar=false", "checkpoint.keep=2"]


def _bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _save(trainer: Trainer, async_save: bool) -> tuple[float, float, Path]:
    """(seconds until save() returned, seconds until the checkpoint was complete, its path)."""
    trainer.cfg.checkpoint.async_save = async_save
    # save() returns at once for a step that already has a checkpoint: that is no timing.
    assert not is_complete(step_dir(trainer.run_dir, trainer.step)), trainer.step
    start = time.perf_counter()
    path = trainer.save_checkpoint()
    returned = time.perf_counter()
    trainer.checkpointer.wait()
    return returned - start, time.perf_counter() - start, path


def run(overrides: list[str], repeats: int) -> dict:
    cfg = to_config(compose(DEFAULTS + overrides))
    cfg.trainer.global_batch_tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
    generator = torch.Generator().manual_seed(0)
    window = torch.randint(cfg.model.vocab_rows, (cfg.trainer.micro_batch_size,
                                                  cfg.data.seq_len + 1), generator=generator)
    batch = Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous())
    run_dir = Path(tempfile.mkdtemp(prefix="sf-bench-checkpoint-"))
    try:
        trainer = Trainer(cfg, run_dir, data=(itertools.repeat(batch), None))
        trainer.train_step(trainer.train_batches)
        times: dict[str, list[float]] = {"sync": [], "async_blocked": [], "async_complete": [],
                                         "load": []}
        sizes = []
        for _ in range(repeats):
            blocked, complete, sync_path = _save(trainer, async_save=False)
            times["sync"].append(complete)
            sizes.append(_bytes_on_disk(sync_path))
            trainer.train_step(trainer.train_batches)  # a new step to save
            blocked, complete, async_path = _save(trainer, async_save=True)
            times["async_blocked"].append(blocked)
            times["async_complete"].append(complete)
            # Loading the newest checkpoint keeps the step count going up, so every save of
            # the next repetition writes a new step.
            start = time.perf_counter()
            trainer.step = trainer.checkpointer.load(async_path)
            times["load"].append(time.perf_counter() - start)
            trainer.train_step(trainer.train_batches)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    params = count_parameters(trainer.model_parts)
    size = statistics.median(sizes)
    print(f"device: CPU ({torch.get_num_threads()} threads) | torch {torch.__version__}")
    print(f"model: {cfg.model.name}, {params / 1e6:.2f}M parameters, fp32, with AdamW state | "
          f"{repeats} repetitions, medians | checkpoint {size / 2**20:,.0f} MiB on disk "
          f"({size / params:.1f} bytes/parameter)")
    medians = {label: statistics.median(values) for label, values in times.items()}
    sync = medians["sync"]
    for label, what in (("sync", "sync save (blocked = complete)"),
                        ("async_blocked", "async save, training blocked"),
                        ("async_complete", "async save, until complete"),
                        ("load", "load (resume)")):
        seconds = medians[label]
        # Only the blocked part of an async save moves no bytes to or from disk.
        rate = "" if label == "async_blocked" else f" | {size / seconds / 2**20:5.0f} MiB/s"
        print(f"{what:>32}: {seconds:7.2f} s | ratio to sync save {seconds / sync:.3f}{rate}")
    return {**medians, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (medians printed)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama_small")
    args = parser.parse_args()
    run(args.overrides, args.repeats)


if __name__ == "__main__":
    main()
