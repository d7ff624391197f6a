"""The layout of one token shard on disk.

`<name>.bin` holds every document's ids followed by EOS, back to back, as uint16 when the
vocabulary fits (vocab_size <= 65536) and uint32 otherwise; no header (the manifest says
the dtype). `<name>.idx.npy` holds int64 offsets: document i spans
[offsets[i], offsets[i + 1]) of the shard, its EOS included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id below `vocab_size`."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def index_path(tokens_path: Path) -> Path:
    """Where the document index of a shard lives: `x.bin` -> `x.idx.npy`."""
    return Path(tokens_path).with_suffix(".idx.npy")


def read_document_index(tokens_path: Path) -> np.ndarray:
    """Document start offsets of a shard: int64, shape (num_documents + 1,)."""
    return np.load(index_path(tokens_path))
