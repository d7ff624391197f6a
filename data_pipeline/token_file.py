"""Token streams on disk: a flat binary file of token ids plus an index of document starts.

`<name>.bin` holds every document's ids followed by EOS, back to back, as uint16 when the
vocabulary fits (vocab_size <= 65536) and uint32 otherwise; no header, so the reader needs
the vocab size. `<name>.idx.npy` holds int64 offsets: document i spans
[offsets[i], offsets[i + 1]) of the stream, its EOS included.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id below `vocab_size`."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def index_path(tokens_path: Path) -> Path:
    """Where the document index of a token file lives: `x.bin` -> `x.idx.npy`."""
    return Path(tokens_path).with_suffix(".idx.npy")


def write_token_file(
    tokens_path: Path, documents: Iterable[Sequence[int]], vocab_size: int, eos_id: int
) -> int:
    """Write each document's ids followed by `eos_id` to `tokens_path`, and its index.

    `documents` may be a generator, so a corpus never has to fit in memory at once.
    Returns the number of tokens written, EOS tokens included.
    """
    dtype = token_dtype(vocab_size)
    offsets = [0]
    with open(tokens_path, "wb") as stream:
        for ids in documents:
            tokens = np.asarray([*ids, eos_id], dtype=np.int64)
            if tokens.min() < 0 or tokens.max() >= vocab_size:
                raise ValueError(f"token ids must lie in [0, {vocab_size}) to fit {dtype}")
            tokens.astype(dtype).tofile(stream)
            offsets.append(offsets[-1] + len(tokens))
    np.save(index_path(tokens_path), np.asarray(offsets, dtype=np.int64))
    return offsets[-1]


def read_token_file(tokens_path: Path, vocab_size: int) -> np.ndarray:
    """The token stream of `tokens_path`, memory-mapped read-only: shape (num_tokens,)."""
    dtype = token_dtype(vocab_size)
    if Path(tokens_path).stat().st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(tokens_path, dtype=dtype, mode="r")


def read_document_index(tokens_path: Path) -> np.ndarray:
    """Document start offsets of `tokens_path`: int64, shape (num_documents + 1,)."""
    return np.load(index_path(tokens_path))
