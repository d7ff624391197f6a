"""The run most tests train: llama_micro on CPU in fp32, on a synthetic token stream, so a
real training run takes seconds."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scaleforge.core.config import Config, compose, to_config
from scaleforge.data_pipeline.loader import TrainBatches, ValBatches
from scaleforge.data_pipeline.samples import TokenWindows

# The end-of-document id of the synthetic stream under data.document_masking: about one
# token in 16 becomes it, so a 64-token window holds several documents.
SYNTHETIC_EOS_ID = 0

def micro_config(run_dir, *overrides: str) -> Config:
    """llama_micro on CPU in fp32 with W&B off; `overrides` as on the command line."""
    base = [
        "model=llama_micro",
        "data.vocab_size=512",
        "data.seq_len=64",
        "trainer.micro_batch_size=4",
        "trainer.global_batch_tokens=512",
        "trainer.precision=fp32",
        "trainer.device=cpu",
        "trainer.max_steps=5",
        "trainer.log_every=1",
        "trainer.eval_every=5",
        "trainer.eval_batches=2",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
        f"run_dir={run_dir}",
    ]
    return to_config(compose(base + list(overrides)))


def synthetic_data(cfg: Config, num_windows: int = 64, seed: int = 0, dp_rank: int = 0,
                   dp_size: int = 1) -> tuple[TrainBatches, ValBatches]:
    """(train batches, val batches) of data-parallel rank `dp_rank` of `dp_size` over a
    random token stream shaped for `cfg`; every rank's stream is the same. With
    cfg.data.document_masking the stream holds documents (SYNTHETIC_EOS_ID after each) and
    the batches carry their document ids."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.data.vocab_size, num_windows * cfg.data.seq_len + 1)
    eos_id = SYNTHETIC_EOS_ID if cfg.data.document_masking else None
    if eos_id is not None:
        tokens[rng.random(len(tokens)) < 1 / 16] = eos_id
    windows = TokenWindows(tokens.astype(np.uint16), cfg.data.seq_len)
    mbs = cfg.trainer.micro_batch_size
    train = TrainBatches(windows, mbs, cfg.data.seed, dp_rank, dp_size, eos_id=eos_id)
    return train, ValBatches(windows, mbs, dp_rank, dp_size, eos_id)


def cut_and_resume(run: Callable[..., Any], root: Path, step: int,
                   *overrides: str) -> tuple[Any, Any]:
    """The resume tests' interrupted run: `run(root / "full", *overrides)` uninterrupted,
    `run(root / "cut", *overrides, "checkpoint.every=<step>")`, then a fresh run directory
    `root / "resumed"` holding only the cut run's step-`step` checkpoint, which
    `run(root / "resumed", *overrides)` resumes (trainer.resume=auto). `run(run_dir,
    *overrides)` trains and returns its Trainer; returns the full and the resumed ones."""
    full = run(root / "full", *overrides)
    run(root / "cut", *overrides, f"checkpoint.every={step}")
    checkpoint = Path("checkpoints") / f"step_{step}"
    shutil.copytree(root / "cut" / checkpoint, root / "resumed" / checkpoint)
    return full, run(root / "resumed", *overrides)
