"""Shared fixtures: small configs and data that make a real training run take seconds."""

from __future__ import annotations

import numpy as np
import pytest

from scaleforge.core.config import Config, compose, to_config
from scaleforge.data_pipeline.loader import TokenWindows, TrainBatches, ValBatches


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


def synthetic_data(cfg: Config, num_windows: int = 64, seed: int = 0):
    """(train batches, val batches) over a random token stream shaped for `cfg`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.data.vocab_size, num_windows * cfg.data.seq_len + 1)
    windows = TokenWindows(tokens.astype(np.uint16), cfg.data.seq_len)
    train = TrainBatches(windows, cfg.trainer.micro_batch_size, cfg.data.seed)
    return train, ValBatches(windows, cfg.trainer.micro_batch_size)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A data cache directory shared by the tests that prepare the real (stdlib) corpus."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def stdlib_overrides(data_cache) -> list[str]:
    """Overrides that train on a 300 kB slice of the Python standard library."""
    return [
        "data.corpus=stdlib",
        "data.max_corpus_bytes=300000",
        "data.val_fraction=0.1",
        f"data.cache_dir={data_cache}",
    ]
