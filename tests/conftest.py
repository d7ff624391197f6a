"""Shared fixtures: a small corpus, a tokenizer and shards made from it, and the real
(stdlib) corpus's settings. Helper functions live in their own modules (micro_runs,
run_metrics, layout_runs, distributed, commands), which tests import directly."""

from __future__ import annotations

import os
import platform

# One CPU kernel family on every x86 machine, set before torch loads (spawned ranks and
# subprocesses inherit it): AVX-512 kernels round fp32 sums in another order than AVX2 ones,
# and the layout-equivalence tests compare runs to 2e-5, so their numbers must not depend on
# which CPU the CI machine has (seen: tp2's embedding off by 2.5e-5 in one of 32768 elements
# after five AdamW steps with AVX-512 kernels, within 2e-5 with AVX2 ones).
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked `cuda` where no CUDA device is visible."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


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
