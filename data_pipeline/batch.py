"""`Batch`: one micro-batch as the loaders yield it and a training step reads it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# A target that adds neither loss nor gradient (models/loss.py's IGNORE_INDEX, and
# F.cross_entropy's default): prompt tokens of instruction data, padding.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Batch:
    """One micro-batch of packed windows.

    inputs, targets: (micro_batch_size, seq_len) int64 token ids, targets the inputs shifted
    by one (IGNORE_INDEX where a position carries no loss: instruction data's prompts,
    data_pipeline/packed_conversations.py). document_ids: (micro_batch_size, seq_len) int64,
    which document of its row each input position belongs to (data_pipeline.samples.
    document_ids, or the packed conversations), present when the loader was given an EOS id
    (data.document_masking); None otherwise.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    document_ids: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(inputs, targets), then the document ids when the batch has them."""
        both = (self.inputs, self.targets)
        return both if self.document_ids is None else (*both, self.document_ids)

    def to(self, device: torch.device) -> Batch:
        """This batch on `device` (non_blocking: a pinned batch does not wait for it)."""
        return Batch(*(tensor.to(device, non_blocking=True) for tensor in self.tensors()))

    def pin_memory(self) -> Batch:
        """This batch in page-locked host memory, so that its copy to the GPU is queued on
        the stream instead of waiting for it (torch's DataLoader calls this with
        pin_memory=True). Needs an accelerator (CUDA)."""
        return Batch(*(tensor.pin_memory() for tensor in self.tensors()))

    def keep_columns(self, columns: Sequence[slice]) -> Batch:
        """Inputs and targets cut to the positions in `columns`, concatenated in order
        (context parallelism: this rank's chunks of each sequence); the document ids stay
        whole, as attention over the whole sequences needs them."""
        def kept(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor[:, c] for c in columns], dim=1)

        return Batch(kept(self.inputs), kept(self.targets), self.document_ids)


def step_batch(batch: Batch, document_masking: bool, device: torch.device | None = None,
               columns: Sequence[slice] | None = None) -> Batch:
    """`batch` as a training step reads it: its document ids kept only with
    `document_masking` (data.document_masking; ValueError when it has none), moved to
    `device` when given, and cut to `columns` when given (`Batch.keep_columns`)."""
    if document_masking and batch.document_ids is None:
        raise ValueError(
            "data.document_masking=true but the micro-batches hold no document ids; build the "
            "loaders with the tokenizer's eos_id (data_pipeline.loader does so from "
            "data.document_masking) or set data.document_masking=false"
        )
    if not document_masking and batch.document_ids is not None:
        batch = Batch(batch.inputs, batch.targets)
    if device is not None:
        batch = batch.to(device)
    return batch if columns is None else batch.keep_columns(columns)
