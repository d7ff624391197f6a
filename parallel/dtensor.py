"""Reading DTensors as plain tensors."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the full value: DTensors (e.g. a loss under tensor parallelism, a
    replicated DTensor) are gathered, plain tensors returned as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
