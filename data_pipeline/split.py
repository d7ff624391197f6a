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


# sf-preprocess shards warns when validation holds fewer tokens than this: eight
# sequences of 1,024 tokens (each window reads one token more than its length).
ENOUGH_VAL_TOKENS = 8 * 1025


def val_fraction_for(tokens_needed: int, total_tokens: int, documents: int) -> float:
    """The val_fraction that would hold out about `tokens_needed` of `total_tokens` tokens
    in `documents` documents: twice the token share and at least three documents' share
    (whole documents are split, at random), in two significant figures, at most 0.5."""
    fraction = max(2 * tokens_needed / max(total_tokens, 1), 3 / max(documents, 1))
    return min(0.5, float(f"{fraction:.2g}"))
