"""Reading a checkpoint without running code from it, and the checks made before loading.

DCP's metadata is read with an unpickler that admits only DCP's own metadata classes,
torch dtypes and sizes and plain containers; the tensors with `torch.load(weights_only=True)`
(DCP's reader). So a checkpoint file cannot run code.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from scaleforge.core.config import Config, compose, to_config
from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig

_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # rebuilds torch.strided from its name
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}
_SAFE_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """Silence the warning DCP gives on every save and load in one process without a
    process group: one process is a normal layout."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only DCP's metadata dataclasses, torch dtypes/sizes and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_SAFE_MODULE_PREFIXES) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a checkpoint never contains; "
            "refusing to load it (the file may have been tampered with)"
        )


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata read by a restricted unpickler. Tensors are read
    with torch.load(weights_only=True) by DCP itself."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's DCP metadata (tensor shapes, offsets, files), unpickled safely."""
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} does not hold checkpoint metadata")
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


def read_metadata(path: Path) -> Metadata:
    """The DCP metadata of the checkpoint at `path`, read safely."""
    return SafeFileSystemReader(path).read_metadata()


def saved_shapes(metadata: Metadata, prefix: str) -> dict[str, tuple[int, ...]]:
    """Global shape of every saved tensor under `prefix.` (prefix stripped)."""
    cut = len(prefix) + 1
    return {
        key[cut:]: tuple(entry.size)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix + ".") and isinstance(entry, TensorStorageMetadata)
    }


def load_state(path: Path, state: dict[str, Any]) -> None:
    """Fill the tensors of `state` in place from the checkpoint at `path` (collective when
    torch.distributed is initialised; each rank reads the shards its tensors cover)."""
    with quiet_single_process():
        dcp.load(
            state,
            checkpoint_id=path,
            storage_reader=SafeFileSystemReader(path),
            no_dist=not dist.is_initialized(),
        )


def load_checkpoint_config(path: Path) -> Config:
    """The resolved training config saved with a checkpoint (or a run directory)."""
    saved = OmegaConf.load(path / "config.yaml")
    return to_config(OmegaConf.merge(compose(), saved))


def check_model_kind(path: Path, model_cfg: TransformerConfig, setting: str) -> None:
    """Settings that change the model without changing any tensor shape must match the
    checkpoint's (an untied checkpoint loaded into a tied model would silently overwrite
    the embedding with the output weights). Raises a ConfigError naming `setting`."""
    saved = OmegaConf.load(path / "config.yaml").model
    for name in ("family", "tie_embeddings"):
        if saved.get(name) != getattr(model_cfg, name):
            raise ConfigError(
                f"{setting}={path}: the checkpoint's model.{name}={saved.get(name)} but this "
                f"run's is {getattr(model_cfg, name)}; set model.{name}={saved.get(name)}"
            )
