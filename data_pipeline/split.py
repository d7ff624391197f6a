"""The train/validation split: decided by each document's own text, never by its position.

A document is in validation when a hash of its text falls below `val_fraction`, so the
same text lands in the same split wherever it occurs (another file, a duplicate, a
re-run, the streaming path): no document, and no duplicate of it, is ever in both splits.
"""

from __future__ import annotations

import hashlib
import math

_HASH_BYTES = 8


def _hash(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=_HASH_BYTES)
    return int.from_bytes(digest.digest(), "little")


def is_validation(text: str, val_fraction: float) -> bool:
    """True when the document `text` belongs to the validation split."""
    return _hash(text) < val_fraction * 2 ** (8 * _HASH_BYTES)


def hash_position(text: str) -> float:
    """Where the document `text` falls in [0, 1): it is in validation for a val_fraction
    above this."""
    return _hash(text) / 2 ** (8 * _HASH_BYTES)


# sf-preprocess shards warns when validation holds fewer tokens than this: eight
# sequences of 1,024 tokens (each window reads one token more than its length).
ENOUGH_VAL_TOKENS = 8 * 1025
# Validation windows the advice for a too-small validation split aims at (evaluation then
# reads more than one).
VAL_WINDOWS_WANTED = 4
# The documents with the lowest hash positions that sf-preprocess shards records (position,
# tokens), enough to compute the val_fraction that holds out ENOUGH_VAL_TOKENS exactly for
# documents of 20 tokens or more.
LOWEST_DOCUMENTS = 512


def lowest_documents(lists: list[list[list[float]]]) -> list[list[float]]:
    """The LOWEST_DOCUMENTS [position, tokens] pairs of lowest position among `lists`."""
    merged = sorted(pair for pairs in lists for pair in pairs)
    return merged[:LOWEST_DOCUMENTS]


def val_fraction_for(tokens_needed: int, current: float, lowest: list[list[float]],
                     total_tokens: int, documents: int) -> float:
    """The val_fraction that holds out at least `tokens_needed` tokens, `current` being the
    one that held out too few, so never below it: exact from `lowest` (the [hash position,
    tokens] of the documents of lowest position, `lowest_documents`), the smallest fraction
    in two significant figures above the position where their tokens add up to
    `tokens_needed`; else (too few recorded) an estimate with room to spare. At most 0.5."""
    held = 0.0
    for position, tokens in sorted(lowest):
        held += tokens
        if held >= tokens_needed:
            return min(0.5, max(_round_up(position), current))
    if lowest and len(lowest) < LOWEST_DOCUMENTS:  # every document counted: not enough text
        return 0.5
    estimate = max(2 * tokens_needed / max(total_tokens, 1), 3 / max(documents, 1))
    return min(0.5, max(_round_up(estimate), float(f"{2 * current:.2g}")))


def _round_up(fraction: float) -> float:
    """The smallest number of two significant figures strictly above `fraction`."""
    if fraction <= 0:
        return 0.0001
    scale = 10.0 ** (math.floor(math.log10(fraction)) - 1)
    rounded = (math.floor(fraction / scale) + 1) * scale
    return float(f"{rounded:.2g}")
