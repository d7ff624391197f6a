"""The corpus mode (the demo's): tokenizer and shards for `data.corpus`, built on first use.

A corpus is "stdlib" or a glob of files (corpus.py): a text file is one document, a JSONL or
parquet file one per record (sources.py), counted as documents, not files. The result
is an ordinary shard directory (shards.py) in `<data.cache_dir>/<key>/`, where the key
hashes the corpus (its spec and every file's path, size and modification time) and the
settings that change the tokens. It is built in a temporary directory and renamed into
place only when complete, so a directory under the final name is always a finished one; a
later call with the same key reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from scaleforge.data_pipeline.config import DataConfig
from scaleforge.data_pipeline.corpus import find_documents
from scaleforge.data_pipeline.manifest import MANIFEST
from scaleforge.data_pipeline.shards import ShardsJob, write_shards
from scaleforge.data_pipeline.sources import read_documents
from scaleforge.data_pipeline.split import is_validation
from scaleforge.data_pipeline.tokenizer import train_sentencepiece
from scaleforge.data_pipeline.vocabulary import data_vocab_size
from scaleforge.errors import ConfigError

# Bump when the output of prepare changes for the same inputs (tokenizer options, file
# layout), so old cache directories are not reused.
FORMAT_VERSION = 2
TOKENIZER_DIR = "trained_tokenizer"
SHARDS_DIR = "shards"
# The demo corpus is thousands of small files: a few units of this size keep the number
# of shard files small.
_UNIT_BYTES = 1 << 21


def prepare(data_cfg: DataConfig, build: bool = True) -> Path:
    """The shard directory of `data_cfg.corpus`: reused from the cache, or built (train a
    tokenizer on the training documents, then tokenize every document into shards); with
    `build` false a missing cache is a ConfigError instead.

    Safe to call from several processes at once: each builds privately and the first to
    finish wins (calling it on one rank first avoids the duplicated work).
    """
    started = time.perf_counter()
    documents = find_documents(data_cfg.corpus, data_cfg.max_corpus_bytes)
    cache_dir = Path(data_cfg.cache_dir)
    final = cache_dir / cache_key(data_cfg, documents)
    if (final / SHARDS_DIR / MANIFEST).exists():
        print(f"data: reusing {final}")
        return final / SHARDS_DIR
    if not build:
        raise ConfigError(
            f"data.cache_dir={str(cache_dir)!r} holds no prepared data for data.corpus="
            f"{data_cfg.corpus!r} (run from the directory the run was started in, or "
            "rebuild it with sf-preprocess prepare and the run's data.* settings)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=cache_dir))
    try:
        _build(data_cfg, documents, building)
        _move_into_place(building, final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    print(f"data: prepared {final} in {time.perf_counter() - started:.1f} s")
    return final / SHARDS_DIR


def cache_key(data_cfg: DataConfig, documents: list[Path]) -> str:
    """A short hash of everything that decides the prepared tokens."""
    files = []
    for path in documents:
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    inputs = {
        "format": FORMAT_VERSION,
        "corpus": data_cfg.corpus,
        "files": files,
        "vocab_size": data_cfg.vocab_size,
        "max_corpus_bytes": data_cfg.max_corpus_bytes,
        "val_fraction": data_cfg.val_fraction,
        "text_field": data_cfg.text_field,
    }
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]


def _build(data_cfg: DataConfig, files: list[Path], directory: Path) -> None:
    corpus_bytes = sum(path.stat().st_size for path in files)
    print(f"data: {len(files)} files ({corpus_bytes / 1e6:.1f} MB) from {data_cfg.corpus!r}")
    started = time.perf_counter()
    # The tokenizer learns from training documents only, so validation text stays unseen;
    # each is split off by its text, exactly as write_shards splits them.
    texts = (document.text for path in files
             for document in read_documents(str(path), data_cfg.text_field))
    training_texts = (t for t in texts if not is_validation(t, data_cfg.val_fraction))
    vocab_size = data_vocab_size(data_cfg)
    tokenizer_path = train_sentencepiece(
        training_texts, vocab_size, directory / TOKENIZER_DIR, setting="data.vocab_size"
    )
    print(f"data: trained a {vocab_size}-piece tokenizer in "
          f"{time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    job = ShardsJob(input=data_cfg.corpus, tokenizer=str(tokenizer_path),
                    out=str(directory / SHARDS_DIR), workers=0, text_field=data_cfg.text_field,
                    val_fraction=data_cfg.val_fraction, unit_bytes=_UNIT_BYTES, progress=False)
    manifest = write_shards(job, inputs=[str(path) for path in files])
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"data: tokenized {train['documents'] + val['documents']:,} documents into "
          f"{train['tokens']:,} train / {val['tokens']:,} val tokens in "
          f"{time.perf_counter() - started:.1f} s")


def _move_into_place(building: Path, final: Path) -> None:
    """Rename the finished directory to its final name; rename is atomic, so no reader
    ever sees a half-written one. A concurrent prepare may have won the race: keep its."""
    try:
        os.rename(building, final)
    except OSError:
        if not (final / SHARDS_DIR / MANIFEST).exists():
            raise
