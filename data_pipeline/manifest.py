"""The manifest of a shard directory, and the checks that its shards are what it says.

`sf-preprocess shards` writes `manifest.json` last, so a directory without one is an
unfinished run. It records the tokenizer (file, sha256, vocab size, EOS id), the token
dtype, the source, and per split the shards: file, token and document counts and the
sha256 of the token file and of its document index.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scaleforge.data_pipeline.token_file import index_path, token_dtype
from scaleforge.data_pipeline.tokenizer import Tokenizer, file_sha256
from scaleforge.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def load_manifest(directory: Path, setting: str = "data.path") -> dict:
    """The manifest of a finished shard directory; ConfigError naming `setting` otherwise."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"{setting}={str(directory)!r} has no {MANIFEST}: it is not a finished "
            "`sf-preprocess shards` output (an interrupted run resumes when rerun)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ConfigError(
            f"{path} has format {manifest.get('format')}, this version reads {FORMAT_VERSION}; "
            "rerun sf-preprocess shards into a new directory"
        )
    return manifest


def load_shard_tokenizer(directory: Path, manifest: dict) -> Tokenizer:
    """The tokenizer stored with the shards, checked against the manifest's sha256."""
    tokenizer_path = Path(directory) / manifest["tokenizer"]["file"]
    if not tokenizer_path.is_file():
        raise ConfigError(f"{tokenizer_path} is missing; the shard directory is incomplete")
    check_tokenizer_matches(manifest, Tokenizer.load(tokenizer_path), directory)
    return Tokenizer.load(tokenizer_path)


def check_tokenizer_matches(manifest: dict, tokenizer: Tokenizer, directory: Path) -> None:
    """Raise when `tokenizer` is not the one the shards in `directory` were written with."""
    expected = manifest["tokenizer"]["sha256"]
    if tokenizer.hash != expected:
        raise ConfigError(
            f"tokenizer {tokenizer.path} (sha256 {tokenizer.hash[:12]}) is not the one the "
            f"shards in {directory} were written with (sha256 {expected[:12]}); use that "
            "tokenizer or rerun sf-preprocess shards with this one"
        )


def open_split(directory: Path, manifest: dict, split: str, verify: bool) -> list[np.ndarray]:
    """The token streams of one split's shards, memory-mapped, in manifest order.

    Always checks that each shard and index exist and have the recorded sizes (a truncated
    shard fails here). With `verify`, also checks every sha256 and that every token id lies
    below the vocabulary size (reads every byte once). Raises ConfigError naming the shard.
    """
    dtype = np.dtype(manifest["dtype"])
    vocab_size = manifest["tokenizer"]["vocab_size"]
    if token_dtype(vocab_size) != dtype:
        raise ConfigError(f"{directory}/{MANIFEST}: dtype {dtype} cannot hold {vocab_size} ids")
    streams = []
    for shard in manifest["splits"][split]["shards"]:
        path = Path(directory) / shard["file"]
        _check_size(path, shard["tokens"] * dtype.itemsize)
        _check_size(index_path(path), None)
        if verify:
            _check_checksum(path, shard["sha256"])
            _check_checksum(index_path(path), shard["index_sha256"])
        tokens = np.memmap(path, dtype=dtype, mode="r") if shard["tokens"] else np.zeros(0, dtype)
        if verify and len(tokens) and int(tokens.max()) >= vocab_size:
            position = int(np.argmax(tokens >= vocab_size))
            raise ConfigError(
                f"shard {path}: token {position} has id {int(tokens[position])}, beyond the "
                f"vocabulary of {vocab_size}; the shard does not belong to this tokenizer, "
                "rerun sf-preprocess shards"
            )
        streams.append(tokens)
    return streams


def _check_size(path: Path, expected_bytes: int | None) -> None:
    if not path.is_file():
        raise ConfigError(f"shard file {path} is missing; rerun sf-preprocess shards")
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise ConfigError(
            f"shard {path} is {size} bytes but the manifest records {expected_bytes}: it is "
            "truncated or was overwritten; rerun sf-preprocess shards"
        )


def _check_checksum(path: Path, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise ConfigError(
            f"shard {path} is corrupt: sha256 {actual[:12]} differs from the manifest's "
            f"{expected[:12]}; rerun sf-preprocess shards (or restore the file)"
        )
