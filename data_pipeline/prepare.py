"""Turn a corpus into a tokenizer and train/val token files, once per distinct setting.

The result lives in `<data.cache_dir>/<key>/`, where the key hashes the corpus (its spec and
every file's path, size and modification time) and the settings that change the tokens. It
is built in a temporary directory and renamed into place only when complete, so a directory
under the final name is always a finished one; a later call with the same key reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaleforge.core.config import DataConfig
from scaleforge.core.errors import ConfigError
from scaleforge.data_pipeline.corpus import find_documents, read_document
from scaleforge.data_pipeline.token_file import write_token_file
from scaleforge.data_pipeline.tokenizer import Tokenizer, train_tokenizer

# Bump when the output of prepare changes for the same inputs (tokenizer options, file
# layout), so old cache directories are not reused.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_PREFIX = "tokenizer"
TRAIN_TOKENS = "train.bin"
VAL_TOKENS = "val.bin"
# Documents handed to the tokenizer at once: enough to keep every thread busy, few enough
# that their tokens stay small in memory.
_ENCODE_CHUNK = 256


@dataclass(frozen=True)
class PreparedData:
    """A finished cache directory: tokenizer, token files and what went into them."""

    directory: Path
    tokenizer_path: Path
    train_tokens_path: Path
    val_tokens_path: Path
    vocab_size: int
    train_documents: tuple[str, ...]
    val_documents: tuple[str, ...]
    train_tokens: int
    val_tokens: int

    @classmethod
    def load(cls, directory: Path) -> PreparedData:
        """Read the manifest of a finished cache directory."""
        manifest = json.loads((directory / MANIFEST).read_text())
        return cls(
            directory=directory,
            tokenizer_path=directory / manifest["tokenizer"],
            train_tokens_path=directory / manifest["train"]["tokens"],
            val_tokens_path=directory / manifest["val"]["tokens"],
            vocab_size=manifest["vocab_size"],
            train_documents=tuple(manifest["train"]["documents"]),
            val_documents=tuple(manifest["val"]["documents"]),
            train_tokens=manifest["train"]["num_tokens"],
            val_tokens=manifest["val"]["num_tokens"],
        )


def prepare(data_cfg: DataConfig) -> PreparedData:
    """Find the corpus, split it, train the tokenizer and write the token files, or reuse
    the cache directory an earlier call with the same settings left.

    Safe to call from several processes at once: each builds privately and the first to
    finish wins (calling it on one rank first avoids the duplicated work).
    """
    started = time.perf_counter()
    documents = find_documents(data_cfg.corpus, data_cfg.max_corpus_bytes)
    cache_dir = Path(data_cfg.cache_dir)
    final = cache_dir / cache_key(data_cfg, documents)
    if (final / MANIFEST).exists():
        prepared = PreparedData.load(final)
        print(
            f"data: reusing {final} ({prepared.train_tokens:,} train / {prepared.val_tokens:,} "
            f"val tokens)"
        )
        return prepared
    cache_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=cache_dir))
    try:
        _build(data_cfg, documents, building)
        _move_into_place(building, final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    print(f"data: prepared {final} in {time.perf_counter() - started:.1f} s")
    return PreparedData.load(final)


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
        "seed": data_cfg.seed,
    }
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]


def split_documents(
    documents: list[Path], val_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """Split documents into (train, val) at random but reproducibly from `seed`.

    Val gets round(val_fraction x count) documents, at least one, and train keeps at least
    one; no document is in both. Each split keeps the corpus order.
    """
    if len(documents) < 2:
        raise ConfigError(
            "data.corpus: found only one document, but train and validation each need one; "
            "raise data.max_corpus_bytes or widen data.corpus"
        )
    num_val = min(max(1, round(val_fraction * len(documents))), len(documents) - 1)
    val_indices = set(np.random.default_rng(seed).permutation(len(documents))[:num_val].tolist())
    train = [path for i, path in enumerate(documents) if i not in val_indices]
    val = [path for i, path in enumerate(documents) if i in val_indices]
    return train, val


def _build(data_cfg: DataConfig, documents: list[Path], directory: Path) -> None:
    train, val = split_documents(documents, data_cfg.val_fraction, data_cfg.seed)
    corpus_bytes = sum(path.stat().st_size for path in documents)
    print(
        f"data: {len(documents)} documents ({corpus_bytes / 1e6:.1f} MB) from "
        f"{data_cfg.corpus!r}: {len(train)} train, {len(val)} val"
    )
    started = time.perf_counter()
    tokenizer_path = train_tokenizer(train, data_cfg.vocab_size, directory / TOKENIZER_PREFIX)
    tokenizer = Tokenizer(tokenizer_path)
    seconds = time.perf_counter() - started
    print(f"data: trained a {tokenizer.vocab_size}-piece tokenizer in {seconds:.1f} s")
    started = time.perf_counter()
    splits = {
        "train": _write_split(tokenizer, train, directory / TRAIN_TOKENS),
        "val": _write_split(tokenizer, val, directory / VAL_TOKENS),
    }
    print(
        f"data: tokenized {splits['train']['num_tokens']:,} train / "
        f"{splits['val']['num_tokens']:,} val tokens in {time.perf_counter() - started:.1f} s"
    )
    manifest = {
        "format": FORMAT_VERSION,
        "settings": {
            "corpus": data_cfg.corpus,
            "vocab_size": data_cfg.vocab_size,
            "max_corpus_bytes": data_cfg.max_corpus_bytes,
            "val_fraction": data_cfg.val_fraction,
            "seed": data_cfg.seed,
        },
        "corpus_bytes": corpus_bytes,
        "tokenizer": tokenizer_path.name,
        "vocab_size": tokenizer.vocab_size,
        "train": splits["train"],
        "val": splits["val"],
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _write_split(tokenizer: Tokenizer, documents: list[Path], tokens_path: Path) -> dict:
    num_tokens = write_token_file(
        tokens_path, _encoded(tokenizer, documents), tokenizer.vocab_size, tokenizer.eos_id
    )
    return {
        "tokens": tokens_path.name,
        "num_tokens": num_tokens,
        "documents": [str(path) for path in documents],
    }


def _encoded(tokenizer: Tokenizer, documents: list[Path]) -> Iterator[list[int]]:
    for start in range(0, len(documents), _ENCODE_CHUNK):
        texts = [read_document(path) for path in documents[start : start + _ENCODE_CHUNK]]
        yield from tokenizer.encode_many(texts)


def _move_into_place(building: Path, final: Path) -> None:
    """Rename the finished directory to its final name; rename is atomic, so no reader
    ever sees a half-written one. A concurrent prepare may have won the race: keep its."""
    try:
        os.rename(building, final)
    except OSError:
        if not (final / MANIFEST).exists():
            raise
