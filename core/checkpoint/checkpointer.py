"""The checkpointer: saves a run's state into RUN_DIR/checkpoints/step_<N>/ and resumes it.

A checkpoint is one DCP save of

    model.<fqn>, optim.<fqn>.<name>   weights and optimizer state by FQN (core/checkpoint/state.py)
    train.step, train.tokens
    <part key>.<name>      each Stateful part the trainer hands over, under its dotted key:
                           health.nonfinite (skips in a row), health.spikes (the loss-spike
                           detector's running statistics), scaler (fp16 loss scale and
                           growth tracker), and any callback's state
    loader.dp<r>.<key>     the training loader's position of data-parallel rank r
    rng.rank<r>.<device>   torch's generator states of global rank r

plus `config.yaml` (the resolved config) and `complete.json`, written last
(core/checkpoint/atomic_write.py). Every value is a tensor (no pickled objects), and each
DTensor shard records its global offsets, so a checkpoint saved under one (tp, pp, dp)
layout loads under any other. `checkpoint.async_save` stages the state in memory and writes
it in a background thread while training continues; the rename happens when the write is
done.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.stateful import Stateful

from scaleforge.core.checkpoint.atomic_write import AtomicWrite
from scaleforge.core.checkpoint.paths import is_complete, prune_checkpoints, read_info, step_dir
from scaleforge.core.checkpoint.safe_load import (
    check_model_kind,
    load_state,
    read_metadata,
    saved_shapes,
)
from scaleforge.core.checkpoint.state import (
    init_optimizer_state,
    load_model_state,
    model_state,
    optimizer_state,
)
from scaleforge.core.config import Config
from scaleforge.errors import ConfigError
from scaleforge.models.state_dict import check_state_dict_shapes
from scaleforge.parallel.topology import Topology


class Checkpointer:
    """Saves and loads the checkpoints of the run `cfg` in `run_dir` from the parts it is
    given: the model (a train module's `model_parts`) and optimizer, Stateful objects for
    the training loader (None when it keeps no position) and the random generators, and
    `parts`: any further Stateful objects by dotted key (equal on every rank), saved there
    and restored when the checkpoint holds them. Every method that touches a checkpoint is
    collective: all ranks call it at the same step."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        topology: Topology,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: Stateful | None,
        rng: Stateful,
        parts: Mapping[str, Stateful],
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.topology = topology
        self.model = model
        self.optimizer = optimizer
        self.loader = loader
        self.rng = rng
        self.parts = dict(parts)
        self.loaded_from: Path | None = None
        self._rank_key = f"rank{topology.rank}"
        self._pending: AtomicWrite | None = None
        self._async_group: dist.ProcessGroup | None = None
        if cfg.checkpoint.async_save and not dist.is_initialized():
            # the background write warns from its own thread, outside quiet_single_process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavail")

    # ------------------------------------------------------------------- saving

    def save(self, step: int) -> Path:
        """Write the checkpoint of `step` (waiting for a previous async save first); returns
        its final directory. With checkpoint.async_save the directory appears when the
        background write is done (`poll`, `wait`). The checkpoint this run resumed from is
        not written again (e.g. preempted right after resuming)."""
        self.wait()
        final = step_dir(self.run_dir, step)
        resumed = self.loaded_from
        if resumed is not None and is_complete(final) and final.resolve() == resumed.resolve():
            return final
        write = AtomicWrite(final, self.cfg, self.info(step))
        if self.topology.is_rank0:
            write.prepare()
        self._barrier()
        state = self.state(step)
        if self.cfg.checkpoint.async_save:
            write.write(state, dist.is_initialized(), background=True,
                        process_group=self._group_for_async())
            self._pending = write
        else:
            write.write(state, dist.is_initialized())
            self._finish(write)
            self._barrier()
        return final

    def poll(self) -> None:
        """Finish an async save whose write is done (rename and prune). Not collective."""
        if self._pending is not None and self._pending.done():
            self._complete_pending(self._pending)

    def wait(self) -> None:
        """Block until an async save in flight is written and renamed."""
        if self._pending is not None:
            self._complete_pending(self._pending)

    def _complete_pending(self, write: AtomicWrite) -> None:
        self._pending = None
        write.wait()  # re-raise a failed write here
        # DCP's coordinator (rank 0) writes the metadata only after every rank's shards are
        # written, so rank 0's write being done means the whole checkpoint is on disk.
        self._finish(write)

    def _finish(self, write: AtomicWrite) -> None:
        """Rank 0: complete the checkpoint and prune old and interrupted ones."""
        if self.topology.is_rank0:
            write.commit()
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep)

    def state(self, step: int) -> dict[str, Any]:
        """What this rank saves, as nested dicts of tensors (the layout in the docstring)."""
        state: dict[str, Any] = {
            "model": model_state(self.model, "trained"),
            "optim": optimizer_state(self.model, self.optimizer),
            "train": self._train_state(step),
        }
        for key, part in self.parts.items():
            _place(state, key, part.state_dict())
        if self.loader is not None:
            key = f"dp{self.topology.dp_rank}"
            state["loader"] = {key: _to_tensors(self.loader.state_dict(), "loader state")}
        state["rng"] = {self._rank_key: self.rng.state_dict()}
        return state

    def _train_state(self, step: int) -> dict[str, torch.Tensor]:
        tokens = step * self.cfg.trainer.global_batch_tokens
        return {
            "step": torch.tensor(step, dtype=torch.int64),
            "tokens": torch.tensor(tokens, dtype=torch.int64),
        }

    def info(self, step: int) -> dict[str, Any]:
        """complete.json's fields: step, tokens and the layout it was saved under."""
        dims = self.topology.dims
        return {
            "step": step,
            "tokens": step * self.cfg.trainer.global_batch_tokens,
            "layout": {
                "tp": dims.tp,
                "pp": dims.pp,
                "dp_replicate": dims.dp_replicate,
                "dp_shard": dims.dp_shard,
                "cp": dims.cp,
            },
            "world_size": self.topology.world_size,
            "dp_size": self.topology.dp_size,
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

    def load(self, path: Path) -> int:
        """Restore model, optimizer, loader position, RNG and the parts from the checkpoint
        at `path`; return the step it was saved at.

        The saved layout may differ from this run's (DCP reshards). The loader's position
        moves across data-parallel sizes when the loader's state is the same on every rank
        (the shard loader); RNG states are restored only under the same world size."""
        metadata = read_metadata(path)
        info = read_info(path)
        check_model_kind(path, self.cfg.model, "trainer.resume")
        check_state_dict_shapes(
            model_state(self.model, "trained"),
            saved_shapes(metadata, "model"),
            f"checkpoint {path}",
            allow_unexpected=True,
        )
        if not saved_shapes(metadata, "optim"):
            raise ConfigError(
                f"trainer.resume={path}: this checkpoint holds model weights only (no optimizer "
                "state); start from it with trainer.init_from=PATH instead"
            )
        loader_key = self._saved_loader_key(path, info, metadata) if self.loader is not None else ""
        init_optimizer_state(self.optimizer)
        state: dict[str, Any] = {
            "model": model_state(self.model, "trained"),
            "optim": optimizer_state(self.model, self.optimizer),
            "train": self._train_state(0),
        }
        # A part the checkpoint lacks (saved before it existed) keeps its fresh state.
        loaded_parts = {key: part for key, part in self.parts.items() if _holds(metadata, key)}
        for key, part in loaded_parts.items():
            _place(state, key, part.state_dict())
        if self.loader is not None:
            state["loader"] = {loader_key: _loader_skeleton(metadata, loader_key)}
        same_world = info.get("world_size") == self.topology.world_size
        if same_world and _holds(metadata, f"rng.{self._rank_key}"):
            state["rng"] = {self._rank_key: self.rng.state_dict()}
        load_state(path, state)

        load_model_state(self.model, state["model"])
        for key, part in loaded_parts.items():
            part.load_state_dict(_find(state, key))
        if self.loader is not None:
            self.loader.load_state_dict(_from_tensors(state["loader"][loader_key]))
        if "rng" in state:
            self.rng.load_state_dict(state["rng"][self._rank_key])
        self.loaded_from = path
        return int(state["train"]["step"])

    def _saved_loader_key(self, path: Path, info: dict[str, Any], metadata: Metadata) -> str:
        """Whose saved loader position this rank continues from: its own data-parallel
        rank's, or rank 0's under another data-parallel size (only for a loader whose state
        is the group's, `STATE_IS_GLOBAL`). Raises ConfigError when there is none."""
        key = f"dp{self.topology.dp_rank}"
        if info.get("dp_size") != self.topology.dp_size:
            if not getattr(self.loader, "STATE_IS_GLOBAL", False):
                raise ConfigError(
                    f"trainer.resume={path}: the checkpoint was saved with {info['dp_size']} "
                    f"data-parallel ranks and this run has {self.topology.dp_size}; this "
                    "loader's position is per rank (streaming data) and cannot move across "
                    f"data-parallel sizes: resume with {info['dp_size']} data-parallel ranks"
                )
            key = "dp0"  # the shard loader's state counts the whole group's samples
        if not _holds(metadata, f"loader.{key}"):
            raise ConfigError(
                f"trainer.resume={path}: the checkpoint has no data loader position; it cannot "
                "be resumed exactly (start from its weights with trainer.init_from=PATH)"
            )
        return key


def _place(state: dict[str, Any], key: str, value: dict[str, Any]) -> None:
    """Put `value` into the nested `state` at dotted `key` ("health.spikes" ->
    state["health"]["spikes"]), which DCP saves as health.spikes.<name>."""
    *outer, last = key.split(".")
    for name in outer:
        state = state.setdefault(name, {})
    state[last] = value


def _find(state: dict[str, Any], key: str) -> dict[str, Any]:
    """The value `_place` put at dotted `key`."""
    for name in key.split("."):
        state = state[name]
    return state


def _holds(metadata: Metadata, prefix: str) -> bool:
    """Whether the checkpoint saved anything under `prefix.`."""
    return any(key.startswith(prefix + ".") for key in metadata.state_dict_metadata)


def _loader_skeleton(metadata: Metadata, key: str) -> dict[str, torch.Tensor]:
    """Tensors shaped as the saved loader state of `key` (lists vary in length)."""
    return {
        name: torch.zeros(shape, dtype=torch.int64)
        for name, shape in saved_shapes(metadata, f"loader.{key}").items()
    }


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
