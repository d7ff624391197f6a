"""Shared fixtures: small configs and data that make a real training run take seconds."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# One CPU kernel family on every x86 machine, set before torch loads (spawned ranks and
# subprocesses inherit it): AVX-512 kernels round fp32 sums in another order than AVX2 ones,
# and the layout-equivalence tests compare runs to 2e-5, so their numbers must not depend on
# which CPU the CI machine has (seen: tp2's embedding off by 2.5e-5 in one of 32768 elements
# after five AdamW steps with AVX-512 kernels, within 2e-5 with AVX2 ones).
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

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


def metrics_records(run_dir) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def logged_losses(run_dir) -> dict[int, float]:
    """step -> training loss of every logged step of a run."""
    return {r["step"]: r["loss"] for r in metrics_records(run_dir) if "loss" in r}


def synthetic_data(cfg: Config, num_windows: int = 64, seed: int = 0):
    """(train batches, val batches) over a random token stream shaped for `cfg`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.data.vocab_size, num_windows * cfg.data.seq_len + 1)
    windows = TokenWindows(tokens.astype(np.uint16), cfg.data.seq_len)
    train = TrainBatches(windows, cfg.trainer.micro_batch_size, cfg.data.seed)
    return train, ValBatches(windows, cfg.trainer.micro_batch_size)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """60 small documents (at most 3,000 characters) cut from standard-library sources."""
    from scaleforge.data_pipeline.corpus import find_documents, read_document

    sources = [p for p in find_documents("stdlib", 3_000_000) if p.stat().st_size > 3000]
    return [read_document(path)[:3000] for path in sources[:60]]


@pytest.fixture(scope="session")
def jsonl_corpus(tmp_path_factory, texts) -> str:
    """`texts` as three jsonl files, in order; returns their glob."""
    import json

    directory = tmp_path_factory.mktemp("jsonl")
    for part in range(3):
        with open(directory / f"part{part}.jsonl", "w") as stream:
            for text in texts[part * 20 : (part + 1) * 20]:
                stream.write(json.dumps({"text": text, "id": 0}) + "\n")
    return str(directory / "*.jsonl")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, texts) -> str:
    """A 400-piece sentencepiece BPE tokenizer trained on `texts`."""
    from scaleforge.data_pipeline.tokenizer import train_sentencepiece

    directory = tmp_path_factory.mktemp("tokenizer")
    train_sentencepiece(texts, 400, directory)
    return str(directory)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, jsonl_corpus, tokenizer_dir) -> str:
    """`jsonl_corpus` tokenized into shards by two worker processes (10% validation)."""
    from scaleforge.data_pipeline.shards import ShardsJob, write_shards

    out = str(tmp_path_factory.mktemp("shards"))
    write_shards(ShardsJob(input=jsonl_corpus, tokenizer=tokenizer_dir, out=out, workers=2,
                           val_fraction=0.1, shard_tokens=20_000, unit_bytes=1,
                           progress=False))
    return out


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
        "data.val_fraction=0.2",
        f"data.cache_dir={data_cache}",
    ]
