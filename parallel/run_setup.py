"""Starting a run's part of the layout: the device and backend the settings resolve to,
torch.distributed and the meshes (`init_topology`), and two helpers of a distributed start:
data preparation on each node's local rank 0 first (`local_rank0_first`) and errors labelled
with the rank's coordinates (`errors_labelled`).

`parallel.layout.check_layout` runs before any of this (identically on every rank, so a bad
layout stops every rank with the same ConfigError and none waits in a collective);
`init_topology` then starts torch.distributed (NCCL on CUDA, gloo on CPU, or
`parallel.backend`) and builds the `Topology`'s meshes (parallel/topology.py).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from scaleforge.errors import ConfigError
from scaleforge.parallel.config import ParallelConfig
from scaleforge.parallel.topology import MESH_DIMS, TOKEN_DIMS, ParallelDims, Topology
from scaleforge.torch_compat import MeshBackend, flatten_mesh, group_options, unflatten_mesh

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

T = TypeVar("T")
# How long `local_rank0_first` lets the other ranks wait for a node's local rank 0 (tokenizing
# a corpus can take hours). A first runner that fails ends the wait at once (its socket
# closes); this bounds only one that hangs.
PREPARATION_TIMEOUT = datetime.timedelta(hours=24)
# The gloo group of each topology's `local_rank0_first` waits, made on its first call.
_PREPARATION_GROUPS: weakref.WeakKeyDictionary[Topology, dist.ProcessGroup] = (
    weakref.WeakKeyDictionary()
)


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto -> nccl on CUDA, gloo on CPU."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def check_backend(backend: str, device: torch.device) -> None:
    """Raise ConfigError when the `parallel.backend` setting cannot carry the collectives of
    a run on `device`: nccl off CUDA, gloo on CUDA."""
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            f"parallel.backend=nccl needs CUDA tensors, but this run trains on {device.type} "
            "(trainer.device); set parallel.backend=auto (gloo off CUDA) or train on GPUs"
        )
    if backend == "gloo" and device.type == "cuda":
        raise ConfigError(
            "parallel.backend=gloo with trainer.device on CUDA: gloo does not run every "
            "collective on CUDA tensors (not the pipeline's send/recv, for one) and stages "
            "the others through host memory, far slower than NCCL; set parallel.backend=auto "
            "(nccl on CUDA)"
        )


def resolve_device(device: str) -> torch.device:
    """The `trainer.device` setting as a device: `auto` picks CUDA when available (this
    process's current GPU), else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but no CUDA device is visible; use auto or cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def init_topology(parallel: ParallelConfig, dims: ParallelDims, device: str = "auto") -> Topology:
    """Start torch.distributed if needed and build the DeviceMesh of the layout `dims`.

    `dims` is what `check_layout` returned (the layout is not checked again; `check_backend`
    ran in `core.config.validate`); `device` is the trainer.device setting. With one process
    nothing is initialised. On CUDA each process takes GPU $LOCAL_RANK and binds the default
    group to it (`device_id`): NCCL then connects at once, so a broken fabric fails here
    rather than in the first collective, and the mesh's groups split its communicator
    instead of each connecting anew.
    """
    if dims.world_size == 1:
        return Topology(dims, resolve_device(device), mesh=None)
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch_device = resolve_device(device)
    backend = resolve_backend(parallel.backend, torch_device)
    timeout = datetime.timedelta(seconds=parallel.timeout_s)
    if not dist.is_initialized():
        store = _torchrun_attempt_store(timeout)
        device_id = torch_device if torch_device.type == "cuda" else None
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
        else:
            dist.init_process_group(backend=backend, timeout=timeout, store=store,
                                    rank=int(os.environ["RANK"]), world_size=dims.world_size,
                                    device_id=device_id)
    from torch.distributed.device_mesh import init_device_mesh

    # The mesh's groups take their timeout from these options (new groups would otherwise
    # get torch's default, 30 minutes for gloo, whatever init_process_group was given).
    options: dict[int | str, MeshBackend] = {
        name: (backend, group_options(backend, timeout)) for name in MESH_DIMS
    }
    if dist.get_backend() == "fake":
        # The caller started torch's fake group (sf-plan: one process builds the shards of
        # any rank of any world size, no collective runs): the mesh's groups are fake too.
        options = {name: "fake" for name in MESH_DIMS}
    mesh = init_device_mesh(
        torch_device.type, dims.mesh_shape, mesh_dim_names=MESH_DIMS, backend_override=options
    )
    if dims.cp > 1:  # FSDP shards over dp_shard x cp: the cp ranks hold the same weights
        fake = dist.get_backend() == "fake"
        flatten_mesh(mesh["dp_shard", "cp"], "dp_shard_cp", "fake" if fake else (
            backend, group_options(backend, timeout)))
    if sum(getattr(dims, name) > 1 for name in TOKEN_DIMS) > 1:
        fake = dist.get_backend() == "fake"
        flatten_mesh(mesh[TOKEN_DIMS], "dp_cp", "fake" if fake else (
            backend, group_options(backend, timeout)))
    expert_mesh = None
    if parallel.ep > 1:
        fake = dist.get_backend() == "fake"
        expert_mesh = build_expert_mesh(mesh, dims, parallel.ep, "fake" if fake else (
            backend, group_options(backend, timeout)))
    return Topology(dims, torch_device, mesh, expert_mesh)


def build_expert_mesh(mesh: DeviceMesh, dims: ParallelDims, ep: int,
                      backend: MeshBackend) -> DeviceMesh:
    """The mesh ("pp", "dp_replicate", "efsdp", "ep", "tp") of expert parallelism, over the
    same ranks as `mesh` (torchtitan's sparse mesh): the dp_shard x cp ranks (flattened, cp
    inner) cut into efsdp x ep, ep inner. Experts are sharded over "ep" and their shards
    FSDP-sharded over "efsdp" (and replicated over "dp_replicate"); `check_expert_parallel`
    made sure ep divides dp_shard x cp."""
    shard = "dp_shard_cp" if dims.cp > 1 else "dp_shard"
    efsdp = dims.dp_shard * dims.cp // ep
    return unflatten_mesh(mesh["pp", "dp_replicate", shard, "tp"], shard, (efsdp, ep),
                          ("efsdp", "ep"), backend)


def _torchrun_attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun's shared rendezvous store (TORCHELASTIC_USE_AGENT_STORE=True, its
    default), that store with a prefix naming this attempt of the job; None otherwise.

    torchrun (torch 2.13) keeps one store across the restarts of `--max-restarts` and its
    workers use it without a per-attempt prefix, so restarted workers read the addresses the
    killed attempt's process groups published and fail to connect ("Gloo connectFullMesh
    failed ... Connection refused"). The prefix keeps each attempt's keys apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"scaleforge/attempt_{attempt}/", store)


def local_rank0_first(topology: Topology, task: Callable[[], T]) -> T:
    """Run `task` on each node's local rank 0 first, then on the other ranks (which then
    find its results, e.g. prepared data, in place). A ConfigError raised by a first
    runner is raised on every rank, so no rank waits for one that has stopped. Collective.

    The other ranks wait in a collective over a gloo group of its own (made once per
    topology), with PREPARATION_TIMEOUT: on the training groups the wait would end after
    `parallel.timeout_s`, and under NCCL its watchdog would kill the job.
    """
    if not topology.is_distributed:
        return task()
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    results: list[T] = []  # the first runner's result, once it has one
    error = None
    if first:
        try:
            results.append(task())
        except ConfigError as raised:
            error = str(raised)
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=_preparation_group(topology))
    reported = next((e for e in errors if e is not None), None)
    if reported is not None:
        raise ConfigError(reported)
    return results[0] if first else task()


def _preparation_group(topology: Topology) -> dist.ProcessGroup:
    group = _PREPARATION_GROUPS.get(topology)
    if group is None:
        group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
        _PREPARATION_GROUPS[topology] = group
    return group


@contextlib.contextmanager
def errors_labelled(topology: Topology) -> Iterator[None]:
    """Re-raise any error of this block with this rank's coordinates in front, so a
    collective timeout or a crash on one rank says which rank and group it was."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as error:
        if not topology.is_distributed:
            raise
        message = f"rank {topology.rank} {topology.label()} ({topology.groups()}): {error}"
        try:
            labelled = type(error)(message)
        except Exception:  # an exception type that takes other arguments
            labelled = RuntimeError(f"{type(error).__name__}: {message}")
        raise labelled from error
