"""One way to write a checkpoint directory atomically, for every save.

The tensors go into `.<name>.partial/` beside the final directory; then config.yaml and,
last, complete.json are written and fsynced, the directory is renamed to its final name and
its parent fsynced. Only directories with complete.json count as checkpoints, so a crash at
any moment leaves the previous checkpoint the newest. The trainer's saves (synchronous and
async) and `sf-convert from-hf`'s weights-only export all go through `AtomicWrite`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from scaleforge.core.checkpoint.paths import COMPLETE, partial_dir
from scaleforge.core.checkpoint.safe_load import quiet_single_process
from scaleforge.core.config import Config

FORMAT_VERSION = 1


class AtomicWrite:
    """The checkpoint directory `final` in the making: `prepare` (one process), `write`
    (every process of the save), then `commit` (one process, once every tensor is on disk).

    `config` is saved as config.yaml (`config_yaml`: that text, when the caller made it
    already); complete.json holds the format version, `info`, the
    time of the save and the torch version.
    """

    def __init__(self, final: Path, config: Config, info: dict[str, Any],
                 config_yaml: str | None = None):
        self.final = final
        self.partial = partial_dir(final)
        self.config = config
        self.config_yaml = config_yaml  # `config` as YAML where the caller has it already
        self.info = {
            "format": FORMAT_VERSION,
            **info,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch": torch.__version__,
        }
        self._background: Future[None] | None = None

    def prepare(self) -> None:
        """Create the empty partial directory, removing one an interrupted save left. One
        process calls it; the others must not write before it is done (a barrier)."""
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)

    def write(
        self,
        state: dict[str, Any],
        distributed: bool,
        background: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        """Write `state` (nested dicts of tensors) into the partial directory with DCP:
        collectively over the world (or `process_group`) when `distributed`, else from this
        process alone. `background` stages the state in memory and writes it in a thread
        (`done` and `wait` follow it)."""
        with quiet_single_process():
            if background:
                response = dcp.async_save(
                    state,
                    checkpoint_id=self.partial,
                    process_group=process_group,
                    no_dist=not distributed,
                )
                # A Future of the write, or (with a non-blocking stager) both stages' Futures
                self._background = (
                    response if isinstance(response, Future) else response.upload_completion
                )
            else:
                dcp.save(state, checkpoint_id=self.partial, process_group=process_group,
                         no_dist=not distributed)

    def done(self) -> bool:
        """Whether the tensors are written (a background write has finished)."""
        return self._background is None or self._background.done()

    def wait(self) -> None:
        """Block until a background write is finished; re-raise its error."""
        if self._background is not None:
            self._background.result()

    def commit(self) -> Path:
        """config.yaml, then complete.json (each fsynced), then the rename to the final
        name (a stale directory there is replaced) and an fsync of the parent. One process,
        after every process's tensors are written; returns the final directory."""
        self.wait()
        yaml = self.config_yaml or config_yaml(self.config)
        _write_synced(self.partial / "config.yaml", yaml)
        _write_synced(self.partial / COMPLETE, json.dumps(self.info, indent=1))
        if self.final.exists():  # an incomplete directory left under the final name
            shutil.rmtree(self.final)
        os.replace(self.partial, self.final)
        _fsync_dir(self.final.parent)
        return self.final


def config_yaml(config: Config) -> str:
    """`config` as the YAML a checkpoint's config.yaml holds."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
