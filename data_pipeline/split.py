"""The train/validation split: decided by each document's own text, never by its position.

A document is in validation when a hash of its text falls below `val_fraction`, so the
same text lands in the same split wherever it occurs (another file, a duplicate, a
re-run, the streaming path): no document, and no duplicate of it, is ever in both splits.
"""

from __future__ import annotations

import hashlib

_HASH_BYTES = 8


def is_validation(text: str, val_fraction: float) -> bool:
    """True when the document `text` belongs to the validation split."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=_HASH_BYTES)
    return int.from_bytes(digest.digest(), "little") < val_fraction * 2 ** (8 * _HASH_BYTES)
