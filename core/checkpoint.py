"""Sharded, reshardable, atomic checkpoints with `torch.distributed.checkpoint` (DCP).

A checkpoint is a directory `RUN_DIR/checkpoints/step_<N>/` holding one DCP save of

    model.<fqn>            the single-process state-dict keys; DTensor shards under TP/FSDP
    optim.<fqn>.<name>     AdamW's exp_avg, exp_avg_sq and step of each parameter, by FQN
    scaler.<name>          fp16 loss scale and growth tracker (one process, CUDA)
    train.step, train.tokens
    health.<...>           skips in a row and the loss-spike detector's running statistics
    loader.dp<r>.<key>     the training loader's position of data-parallel rank r
    rng.rank<r>.<device>   torch's generator states of global rank r

plus `config.yaml` (the resolved config) and `complete.json`, written last. Every value is
a tensor (no pickled objects), and each DTensor shard records its global offsets, so a
checkpoint saved under one (tp, pp, dp) layout loads under any other: optimizer state is
keyed by parameter name, not by position, for the same reason.

Atomicity: the shards are written into `.step_<N>.partial/`, then rank 0 writes
`complete.json` and renames the directory. Only directories with `complete.json` count, so a
crash mid-save leaves the previous checkpoint the newest; stale partial directories are
deleted by the next save. `checkpoint.async_save` stages the state in memory and writes it
in a background thread while training continues; the rename happens when the write is done.

Loading reads DCP's metadata with an unpickler that admits only DCP's own metadata classes,
and the tensors with `torch.load(weights_only=True)` (DCP's reader), so a checkpoint file
cannot run code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from scaleforge.core.config import Config, to_config
from scaleforge.errors import ConfigError
from scaleforge.models.state_dict import check_state_dict_shapes

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Wrapper modules insert these into parameter names; state-dict keys never contain them.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


# ----------------------------------------------------------------------------- locations


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save and load; one process is a normal layout."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def find_checkpoint(path: str | Path, setting: str) -> Path:
    """A complete checkpoint directory from `path`: a step_<N> directory, a run's
    `checkpoints/` directory or a run directory (the newest complete checkpoint)."""
    path = Path(path)
    if is_complete(path):
        return path
    newest = latest_checkpoint(path.parent if path.name == CHECKPOINTS else path)
    if newest is not None:
        return newest
    if path.is_dir() and _STEP_DIR.match(path.name):
        raise ConfigError(
            f"{setting}={path}: this checkpoint is incomplete (no {COMPLETE}; its save was "
            "interrupted); point at a complete one or at the run directory to take the newest"
        )
    raise ConfigError(
        f"{setting}={path}: no complete checkpoint there (expected a step_<N> directory with "
        f"{COMPLETE}, or a run directory with {CHECKPOINTS}/step_<N>/); check the path"
    )


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint `trainer.resume` asks for: never -> None; auto -> the newest complete
    one in `run_dir` (None in a fresh run); anything else is a path that must hold one."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    return find_checkpoint(resume, "trainer.resume")


def read_info(path: Path) -> dict[str, Any]:
    """The contents of a checkpoint's complete.json (step, tokens, layout, time)."""
    return json.loads((path / COMPLETE).read_text())


def load_checkpoint_config(path: Path) -> Config:
    """The resolved training config saved with a checkpoint."""
    from scaleforge.core.config import compose

    saved = OmegaConf.load(path / "config.yaml")
    return to_config(OmegaConf.merge(compose(), saved))


# ----------------------------------------------------------------------------- safe reading


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
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} does not hold checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(path: Path) -> Metadata:
    return SafeFileSystemReader(path).read_metadata()


def saved_shapes(metadata: Metadata, prefix: str) -> dict[str, tuple[int, ...]]:
    """Global shape of every saved tensor under `prefix.` (prefix stripped)."""
    cut = len(prefix) + 1
    return {
        key[cut:]: tuple(entry.size)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix + ".") and isinstance(entry, TensorStorageMetadata)
    }


# ----------------------------------------------------------------------------- state


def clean_fqn(name: str) -> str:
    """A parameter name without the prefixes of activation-checkpoint and compile wrappers
    (the name its state-dict key has)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def model_parts(model: nn.Module) -> list[nn.Module]:
    """The modules whose state dicts together make the model's: the stages of a pipeline
    (`Pipeline.model_parts`, an nn.ModuleList) or the model itself."""
    return list(model) if isinstance(model, nn.ModuleList) else [model]


# With tied embeddings the output projection is the token embedding: stored once, under
# the embedding's name, and loaded into both.
_TIED = {"output.weight": "tok_embeddings.weight"}


def _is_tied(model: nn.Module) -> bool:
    return any(
        getattr(getattr(part, "cfg", None), "tie_embeddings", False) for part in model_parts(model)
    )


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's model state keyed by single-process names (DTensors where sharded); a
    tied output weight is left out (it is the token embedding)."""
    state: dict[str, torch.Tensor] = {}
    for part in model_parts(model):
        state.update(part.state_dict())
    if _is_tied(model):
        for alias, name in _TIED.items():
            if name in state:
                state.pop(alias, None)
    return state


def _load_into_parts(model: nn.Module, loaded: dict[str, torch.Tensor]) -> None:
    """Copy `loaded` (model_state keys) into every part's parameters (strict: every key of
    every part is filled, a tied output weight from the embedding)."""
    for part in model_parts(model):
        part.load_state_dict(
            {k: loaded[k] if k in loaded else loaded[_TIED[k]] for k in part.state_dict()},
            strict=True,
        )


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(single-process name, parameter) of this rank's parameters, each once."""
    seen: set[int] = set()
    for part in model_parts(model):
        for name, param in part.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield clean_fqn(name), param


def _adam_state(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state, created as AdamW would (zeros) when it has none yet."""
    state = optimizer.state[param]
    if not state:
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        on_device = group.get("fused") or group.get("capturable")
        state["step"] = (
            torch.zeros((), dtype=torch.float32, device=param.device)
            if on_device
            else torch.tensor(0.0, dtype=torch.float32)
        )
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, create: bool = False
) -> dict[str, torch.Tensor]:
    """AdamW state as {"<fqn>.<exp_avg|exp_avg_sq|step>": tensor}, keyed by parameter name
    so it reshards like the weights. `create` fills missing state with zeros (to load into)."""
    state: dict[str, torch.Tensor] = {}
    for name, param in named_parameters(model):
        if create:
            entries = _adam_state(optimizer, param)
        else:
            entries = optimizer.state.get(param, {})
        for key, value in entries.items():
            state[f"{name}.{key}"] = value
    return state


def _to_tensors(state: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """A loader state (ints and lists of ints) as int64 tensors."""
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, (int, list, tuple)):
            raise TypeError(f"{where}[{key!r}]={value!r} is not an int or a list of ints")
        tensors[key] = torch.tensor(value, dtype=torch.int64)
    return tensors


def _from_tensors(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {key: (t.item() if t.ndim == 0 else t.tolist()) for key, t in state.items()}


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Saves and loads the trainer's checkpoints. Every method that touches a checkpoint is
    collective: all ranks call it at the same step."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.cfg = trainer.cfg.checkpoint
        self.topology = trainer.topology
        self.run_dir = Path(trainer.run_dir)
        self._pending: tuple[Future, Path, Path, dict] | None = None
        self._async_group: dist.ProcessGroup | None = None
        if self.cfg.async_save and not dist.is_initialized():
            # the background write warns from its own thread, outside _quiet_single_process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavail")

    # ------------------------------------------------------------------- what goes in

    def _state(self, for_loading: Metadata | None = None) -> dict[str, Any]:
        t = self.trainer
        topo = self.topology
        state: dict[str, Any] = {
            "model": model_state(t.model),
            "optim": optimizer_state(t.model, t.optimizer, create=for_loading is not None),
            "train": {
                "step": torch.tensor(t.step, dtype=torch.int64),
                "tokens": torch.tensor(
                    t.step * t.cfg.trainer.global_batch_tokens, dtype=torch.int64
                ),
            },
        }
        # Equal on every rank (decided from all-reduced values).
        state["health"] = {
            "nonfinite": t.nonfinite_guard.state_dict(),
            "spikes": t.spike_detector.state_dict(),
        }
        scaler = t.precision.scaler
        if scaler is not None and scaler.is_enabled():
            state["scaler"] = {
                "scale": torch.tensor(float(scaler.get_scale()), dtype=torch.float32),
                "growth_tracker": torch.tensor(
                    scaler.state_dict()["_growth_tracker"], dtype=torch.int64
                ),
            }
        loader = t.train_batches
        if hasattr(loader, "state_dict"):
            key = f"dp{topo.dp_rank}"
            if for_loading is None:
                state["loader"] = {key: _to_tensors(loader.state_dict(), "loader state")}
            else:
                state["loader"] = {key: self._loader_skeleton(for_loading, key)}
        rank = f"rank{dist.get_rank() if dist.is_initialized() else 0}"
        rng = {"cpu": torch.get_rng_state()}
        if t.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(t.device)
        state["rng"] = {rank: rng}
        return state

    def _loader_skeleton(self, metadata: Metadata, key: str) -> dict[str, torch.Tensor]:
        """Tensors shaped as the saved loader state of `key` (lists vary in length)."""
        return {
            name: torch.zeros(shape, dtype=torch.int64)
            for name, shape in saved_shapes(metadata, f"loader.{key}").items()
        }

    # ------------------------------------------------------------------- saving

    def save(self) -> Path:
        """Write the checkpoint of the trainer's current step (waiting for a previous async
        save first); returns its final directory. With async_save the directory appears
        when the background write is done."""
        self.wait()
        step = self.trainer.step
        final = step_dir(self.run_dir, step)
        resumed = self.trainer.resumed_from
        if resumed is not None and is_complete(final) and final.resolve() == resumed.resolve():
            return final  # e.g. preempted right after resuming: this checkpoint is current
        partial = final.parent / f".{final.name}.partial"
        if self.topology.is_rank0:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        self._barrier()
        state = self._state()
        info = self._info()
        if self.cfg.async_save:
            with _quiet_single_process():
                future = dcp.async_save(
                    state,
                    checkpoint_id=partial,
                    process_group=self._group_for_async(),
                    no_dist=not dist.is_initialized(),
                )
            self._pending = (future, partial, final, info)
        else:
            with _quiet_single_process():
                dcp.save(state, checkpoint_id=partial, no_dist=not dist.is_initialized())
            self._finish(partial, final, info)
            self._barrier()
        return final

    def poll(self) -> None:
        """Finish an async save whose write is done (rename and prune). Not collective."""
        if self._pending is not None and self._pending[0].done():
            self._complete_pending()

    def wait(self) -> None:
        """Block until an async save in flight is written and renamed."""
        if self._pending is not None:
            self._pending[0].result()
            self._complete_pending()

    def _complete_pending(self) -> None:
        future, partial, final, info = self._pending
        self._pending = None
        future.result()  # re-raise a failed write here
        # DCP's coordinator (rank 0) writes the metadata only after every rank's shards are
        # written, so rank 0's future being done means the whole checkpoint is on disk.
        self._finish(partial, final, info)

    def _finish(self, partial: Path, final: Path, info: dict) -> None:
        """Rank 0: config and marker into the partial directory, rename, prune old ones."""
        if not self.topology.is_rank0:
            return
        OmegaConf.save(OmegaConf.structured(self.trainer.cfg), partial / "config.yaml")
        marker = partial / COMPLETE
        with open(marker, "w") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # an incomplete directory left under the final name
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(final.parent)
        self._prune()

    def _prune(self) -> None:
        """Keep the newest `checkpoint.keep` complete checkpoints (0 keeps all); delete
        partial directories of interrupted saves."""
        root = checkpoint_root(self.run_dir)
        for path in root.glob(".step_*.partial"):
            if self._pending is None or path != self._pending[1]:
                shutil.rmtree(path, ignore_errors=True)
        if self.cfg.keep > 0:
            for _, path in complete_checkpoints(self.run_dir)[: -self.cfg.keep]:
                shutil.rmtree(path, ignore_errors=True)

    def _info(self) -> dict[str, Any]:
        t, dims = self.trainer, self.topology.dims
        return {
            "format": FORMAT_VERSION,
            "step": t.step,
            "tokens": t.step * t.cfg.trainer.global_batch_tokens,
            "layout": {
                "tp": dims.tp,
                "pp": dims.pp,
                "dp_replicate": dims.dp_replicate,
                "dp_shard": dims.dp_shard,
            },
            "world_size": self.topology.world_size,
            "dp_size": self.topology.dp_size,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch": torch.__version__,
        }

    def _group_for_async(self) -> dist.ProcessGroup | None:
        """A gloo group of its own for the background write's collectives, so they never
        interleave with the training's collectives (NCCL or gloo) on a shared group."""
        if not dist.is_initialized():
            return None
        if self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # ------------------------------------------------------------------- loading

    def load(self, path: Path) -> None:
        """Restore model, optimizer, step, loader position, loss scale and RNG from `path`.

        The saved layout may differ from this run's (DCP reshards). The loader's position
        moves across data-parallel sizes when the loader's state is the same on every rank
        (the shard loader); RNG states are restored only under the same world size."""
        t = self.trainer
        metadata = read_metadata(path)
        info = read_info(path)
        check_model_kind(path, t.cfg.model, "trainer.resume")
        check_state_dict_shapes(
            model_state(t.model),
            saved_shapes(metadata, "model"),
            f"checkpoint {path}",
            allow_unexpected=True,
        )
        if not saved_shapes(metadata, "optim"):
            raise ConfigError(
                f"trainer.resume={path}: this checkpoint holds model weights only (no optimizer "
                "state); start from it with trainer.init_from=PATH instead"
            )
        state = self._state(for_loading=metadata)
        saved = metadata.state_dict_metadata
        loader_key = f"dp{self.topology.dp_rank}"
        same_dp = info.get("dp_size") == self.topology.dp_size
        if "loader" in state and not same_dp:
            if not getattr(t.train_batches, "STATE_IS_GLOBAL", False):
                raise ConfigError(
                    f"trainer.resume={path}: the checkpoint was saved with {info['dp_size']} "
                    f"data-parallel ranks and this run has {self.topology.dp_size}; this "
                    "loader's position is per rank (streaming data) and cannot move across "
                    f"data-parallel sizes: resume with {info['dp_size']} data-parallel ranks"
                )
            # the shard loader's state counts the whole group's samples: any rank's will do
            loader_key = "dp0"
            state["loader"] = {loader_key: self._loader_skeleton(metadata, loader_key)}
        if "loader" in state and not any(k.startswith(f"loader.{loader_key}.") for k in saved):
            raise ConfigError(
                f"trainer.resume={path}: the checkpoint has no data loader position; it cannot "
                "be resumed exactly (start from its weights with trainer.init_from=PATH)"
            )
        rank_key = next(iter(state["rng"]))
        if (
            not any(k.startswith(f"rng.{rank_key}.") for k in saved)
            or info.get("world_size") != self.topology.world_size
        ):
            state.pop("rng")
        if "scaler" in state and not any(k.startswith("scaler.") for k in saved):
            state.pop("scaler")
        if not any(k.startswith("health.") for k in saved):
            state.pop("health")
        _load(path, state)

        _load_into_parts(t.model, state["model"])
        t.step = int(state["train"]["step"])
        if "health" in state:
            t.nonfinite_guard.load_state_dict(state["health"]["nonfinite"])
            t.spike_detector.load_state_dict(state["health"]["spikes"])
        if "loader" in state:
            t.train_batches.load_state_dict(_from_tensors(state["loader"][loader_key]))
        if "scaler" in state:
            scaler = t.precision.scaler
            scaler.load_state_dict(
                {
                    **scaler.state_dict(),
                    "scale": float(state["scaler"]["scale"]),
                    "_growth_tracker": int(state["scaler"]["growth_tracker"]),
                }
            )
        if "rng" in state:
            rng = state["rng"][rank_key]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], t.device)


def check_model_kind(path: Path, model_cfg: Any, setting: str) -> None:
    """Settings that change the model without changing any tensor shape must match the
    checkpoint's (an untied checkpoint loaded into a tied model would silently overwrite
    the embedding with the output weights)."""
    saved = OmegaConf.load(path / "config.yaml").model
    for name in ("family", "tie_embeddings"):
        if saved.get(name) != getattr(model_cfg, name):
            raise ConfigError(
                f"{setting}={path}: the checkpoint's model.{name}={saved.get(name)} but this "
                f"run's is {getattr(model_cfg, name)}; set model.{name}={saved.get(name)}"
            )


def _load(path: Path, state: dict[str, Any]) -> None:
    """Fill `state` in place from the checkpoint at `path` (collective when distributed)."""
    with _quiet_single_process():
        dcp.load(
            state,
            checkpoint_id=path,
            storage_reader=SafeFileSystemReader(path),
            no_dist=not dist.is_initialized(),
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- weights only


def load_model_weights(
    model: nn.Module, path: str | Path, setting: str, model_cfg: Any = None
) -> Path:
    """Fill `model` (any layout; a pipeline's `model_parts`) with the weights of the
    checkpoint at `path` (a step directory or a run directory: the newest one). Collective.
    Returns the checkpoint directory used."""
    path = find_checkpoint(path, setting)
    if model_cfg is not None:
        check_model_kind(path, model_cfg, setting)
    metadata = read_metadata(path)
    state = model_state(model)
    check_state_dict_shapes(
        state, saved_shapes(metadata, "model"), f"checkpoint {path}", allow_unexpected=True
    )
    wrapped = {"model": state}
    _load(path, wrapped)
    _load_into_parts(model, wrapped["model"])
    return path


def save_model_checkpoint(
    state_dict: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path
) -> Path:
    """Write a model-only checkpoint (weights, config.yaml, complete.json) into `out_dir`,
    atomically, from one process: what `sf-convert from-hf` produces and
    `trainer.init_from` reads."""
    out_dir = Path(out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    state = dict(state_dict)
    if cfg.model.tie_embeddings:
        for alias in _TIED:
            state.pop(alias, None)
    with _quiet_single_process():
        dcp.save({"model": state}, checkpoint_id=partial, no_dist=True)
    OmegaConf.save(OmegaConf.structured(cfg), partial / "config.yaml")
    (partial / COMPLETE).write_text(
        json.dumps(
            {
                "format": FORMAT_VERSION,
                "step": 0,
                "tokens": 0,
                "model_only": True,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "torch": torch.__version__,
            },
            indent=1,
        )
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return out_dir


def load_model_checkpoint(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, full single-process state dict on CPU) of a checkpoint, in one process
    without a process group. `path` as for `find_checkpoint`."""
    from scaleforge.models import build

    path = find_checkpoint(path, "ckpt")
    cfg = load_checkpoint_config(path)
    model = build(cfg.model, device=torch.device("cpu"))
    load_model_weights(model, path, "ckpt", cfg.model)
    return cfg, model.state_dict()
