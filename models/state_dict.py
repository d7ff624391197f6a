"""Checks that a state dict fits a model before any tensor is copied into it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from scaleforge.errors import ConfigError

# A tensor, or its shape (torch.Size or a tuple of ints, as a checkpoint's metadata gives).
TensorOrShape = torch.Tensor | torch.Size | tuple[int, ...]


def check_state_dict_shapes(
    expected: Mapping[str, TensorOrShape],
    got: Mapping[str, TensorOrShape],
    where: str,
    allow_unexpected: bool = False,
) -> None:
    """Raise ConfigError unless `got` has exactly the keys of `expected`, each of its shape
    (with `allow_unexpected`, `got` may hold more: a pipeline rank loads only its stages).

    `expected` and `got` map tensor names to tensors (or shapes); `where` names the source of
    `got` (a checkpoint path, "Hugging Face model") so the message says what to fix. Keys are
    checked in the order of `expected`, so the first mismatching tensor is the one named.
    A DTensor reports its global shape, so sharded state dicts compare as full ones.
    """
    for name, reference in expected.items():
        if name not in got:
            raise ConfigError(
                f"{where}: tensor {name} is missing; the checkpoint was written for a "
                "different model (check model.family, model.n_layers and model.tie_embeddings)"
            )
        want, have = _shape(reference), _shape(got[name])
        if want != have:
            raise ConfigError(
                f"{where}: tensor {name} has shape {have} but the model expects {want}; the "
                "checkpoint was written for a different model shape (check the model.* settings)"
            )
    unexpected = [name for name in got if name not in expected]
    if unexpected and not allow_unexpected:
        raise ConfigError(
            f"{where}: tensor {unexpected[0]} (shape {_shape(got[unexpected[0]])}) does not "
            f"belong to the model ({len(unexpected)} unexpected tensors); the checkpoint was "
            "written for a different model"
        )


def _shape(value: TensorOrShape) -> tuple[int, ...]:
    return tuple(value.shape if isinstance(value, torch.Tensor) else value)
