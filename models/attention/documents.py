"""Per-document positions of packed rows, shared by the kernels' masks and RoPE.

`document_ids` (B, T) int64 says which document of its row each position belongs to
(data_pipeline.samples.document_ids: 0, 1, ... in order, an EOS in the document it ends).
With them no token attends to another document.
"""

from __future__ import annotations

import torch


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a document begins (every row's first position, and each
    position whose document differs from the one before)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: each position's offset from the start of its document (0 at each
    document's first token), for RoPE positions that restart at every document."""
    index = torch.arange(document_ids.size(1), device=document_ids.device)
    start = torch.where(document_starts(document_ids), index, 0).cummax(dim=1).values
    return index - start
