"""Snapshots taken without stopping training: the state is copied to host memory at the
step boundary (pinned on CUDA), and a background thread writes it into node-local storage
and copies this rank's files to its peer's folder (layout in core/checkpoint/snapshots.py).

What the training thread pays per snapshot is the copy (`SnapshotWriter.start`); the write
overlaps the next step. `wait` joins the write in flight, and the callback calls it one step
after the snapshot was taken, so a snapshot is on disk by the end of the step after it:
a failure loses at most `checkpoint.snapshot_every` completed steps. The next snapshot also
waits for the previous one, which frees the staging buffers it reuses.

Nothing torn is ever picked up: the snapshot is written into `.step_<N>.partial/` and
renamed to `step_<N>/` by rank 0 after every rank's files (and complete.json) are written;
each peer copy goes to `.step_<N>.partial/` in the peer's folder and is renamed when
complete; restores (`snapshots.newest_reachable`) only read `step_<N>` folders.

The background write's collectives (DCP's plan and result exchange, two barriers) run on a
gloo group of its own, so they never interleave with the training's collectives.
"""

from __future__ import annotations

import datetime
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from scaleforge.core.checkpoint.atomic_write import AtomicWrite, config_yaml
from scaleforge.core.checkpoint.checkpointer import Checkpointer
from scaleforge.core.checkpoint.paths import prune_checkpoints, step_dir
from scaleforge.core.checkpoint.snapshots import KEEP, copy_to_peer
from scaleforge.torch_compat import copy_to_host


class SnapshotWriter:
    """Writes the snapshots of `checkpointer`'s state (the run's own checkpointer: same
    parts, same layout) into `root`, one in flight at a time. `timeout_s` bounds the
    background write's collectives (`parallel.timeout_s`)."""

    def __init__(self, checkpointer: Checkpointer, root: Path, device: torch.device,
                 timeout_s: float):
        self.checkpointer = checkpointer
        self.root = root
        self.timeout_s = timeout_s
        topology = checkpointer.topology
        self.rank, self.world_size = topology.rank, topology.world_size
        self.is_rank0 = topology.is_rank0
        # Host buffers (pinned on CUDA), refilled at every snapshot while the state's layout
        # (keys, shapes, dtypes) stays the same; the previous write is done by then.
        self._pin_memory = device.type == "cuda"
        self._buffers: dict | None = None
        self._layout: list | None = None
        # The run's config does not change: its YAML is made once, not at every snapshot.
        self._config_yaml = config_yaml(checkpointer.cfg)
        self._group: dist.ProcessGroup | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def in_flight(self) -> bool:
        """Whether a snapshot's background write has been started and not yet waited for."""
        return self._thread is not None

    def start(self, step: int) -> None:
        """Copy the state of `step` to host memory and start writing it in the background
        (after waiting for the previous snapshot). Collective: every rank, same step."""
        self.wait()
        state = self._to_host(self.checkpointer.state(step))
        write = AtomicWrite(step_dir(self.root, step), self.checkpointer.cfg,
                            self.checkpointer.info(step), self._config_yaml)
        group = self._process_group()
        self._thread = threading.Thread(target=self._run, args=(write, state, group),
                                        name=f"scaleforge-snapshot-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the snapshot in flight is written, renamed and copied to the peer;
        re-raise its error."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _to_host(self, state: dict) -> dict:
        """`state` copied into the host buffers (new ones when its layout changed)."""
        layout = _layout(state)
        if layout != self._layout:
            self._buffers, self._layout = None, layout
        self._buffers = copy_to_host(state, self._buffers, self._pin_memory)
        return self._buffers

    def _run(self, write: AtomicWrite, state: dict, group: dist.ProcessGroup | None) -> None:
        try:
            self._write(write, state, group)
        except BaseException as error:  # handed to the training thread by wait()
            self._error = error

    def _write(self, write: AtomicWrite, state: dict, group: dist.ProcessGroup | None) -> None:
        """The background part: every rank writes its shard into the partial folder, the
        other ranks copy theirs to their peers from there, then rank 0 completes and renames
        the snapshot, prunes old ones and copies its own files (with complete.json)."""
        step = int(write.info["step"])
        if self.is_rank0:
            write.prepare()
        self._barrier(group)
        write.write(state, group is not None, process_group=group)
        if not self.is_rank0:
            copy_to_peer(self.root, write.partial, step, self.rank, self.world_size)
        self._barrier(group)  # every shard is written and copied before the rename
        if self.is_rank0:
            write.commit()
            prune_checkpoints(self.root, KEEP)
            copy_to_peer(self.root, write.final, step, self.rank, self.world_size)

    def _process_group(self) -> dist.ProcessGroup | None:
        """A gloo group of its own for the background write (None in a single process)."""
        if not dist.is_initialized():
            return None
        if self._group is None:
            self._group = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
        return self._group

    @staticmethod
    def _barrier(group: dist.ProcessGroup | None) -> None:
        if group is not None:
            dist.barrier(group=group)


def _layout(state: dict, prefix: str = "") -> list:
    """(dotted key, shape, dtype) of every tensor in nested dicts `state`."""
    layout: list = []
    for key, value in state.items():
        if isinstance(value, dict):
            layout += _layout(value, f"{prefix}{key}.")
        else:
            layout.append((prefix + key, tuple(value.shape), value.dtype))
    return layout
