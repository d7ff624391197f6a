"""The process layout: validated once from the `parallel.*` settings, then asked by everything else.

    world = pp x dp_replicate x dp_shard x cp x tp       (Megatron order, tp innermost)

`parallel.layout.check_layout` runs before any process group exists (identically on every
rank, so a bad layout stops every rank with the same ConfigError and none waits in a
collective). `init_topology` then starts torch.distributed (NCCL on CUDA, gloo on CPU, or
`parallel.backend`) and builds one DeviceMesh with the named dims
("pp", "dp_replicate", "dp_shard", "cp", "tp"); every dim is present, size-1 ones included,
so `topology.mesh["tp"]` always exists; with context parallelism it also has the flattened
dim "dp_shard_cp" that FSDP shards over, and when more than one of dp_replicate, dp_shard
and cp is larger than one, the flattened dim "dp_cp" over all three (the ranks that see
different tokens: one all-reduce sums over them, `sum_over_tokens`). With expert
parallelism (parallel.ep > 1) a second mesh over the same ranks, `Topology.expert_mesh`
("pp", "dp_replicate", "efsdp", "ep", "tp"), cuts dp_shard x cp into efsdp x ep
(`build_expert_mesh`). In a single process no group is created and the mesh is None: the
single-process path runs exactly as without this module.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from scaleforge.errors import ConfigError
from scaleforge.parallel.config import ParallelConfig
from scaleforge.torch_compat import (
    MeshBackend,
    flatten_mesh,
    group_options,
    unflatten_mesh,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# The dims whose ranks see different tokens (flattened as "dp_cp" when two or more are > 1).
TOKEN_DIMS = ("dp_replicate", "dp_shard", "cp")
T = TypeVar("T")
# How long `local_rank0_first` lets the other ranks wait for a node's local rank 0 (tokenizing
# a corpus can take hours). A first runner that fails ends the wait at once (its socket
# closes); this bounds only one that hangs.
PREPARATION_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class ParallelDims:
    """The sizes of the layout, dp_shard resolved (never -1)."""

    tp: int
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: each sees different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_DIMS)

    def describe(self) -> str:
        """e.g. 'pp 1 x dp_replicate 1 x dp_shard 2 x cp 1 x tp 2 = 4 processes'."""
        sizes = " x ".join(f"{name} {getattr(self, name)}" for name in MESH_DIMS)
        return f"{sizes} = {self.world_size} processes"


class Topology:
    """Ranks, sizes and meshes of this process; the one object parallel code asks.

    Single process (world size 1): `mesh` is None and every collective helper is a no-op.
    """

    def __init__(self, dims: ParallelDims, device: torch.device, mesh: DeviceMesh | None,
                 expert_mesh: DeviceMesh | None = None):
        self.dims = dims
        self.device = device
        self.mesh = mesh
        self.expert_mesh = expert_mesh  # parallel.ep > 1 only (`build_expert_mesh`)
        self.rank = dist.get_rank() if mesh is not None else 0
        coordinate = mesh.get_coordinate() if mesh is not None else None
        self.coordinates = dict(zip(MESH_DIMS, coordinate or (0,) * len(MESH_DIMS), strict=True))

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def is_distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.dims.dp_size

    @property
    def dp_rank(self) -> int:
        """This replica's index among the dp_replicate x dp_shard data-parallel ranks."""
        return self.coordinates["dp_replicate"] * self.dims.dp_shard + self.coordinates["dp_shard"]

    @property
    def tp_rank(self) -> int:
        return self.coordinates["tp"]

    @property
    def pp_rank(self) -> int:
        return self.coordinates["pp"]

    @property
    def cp_rank(self) -> int:
        return self.coordinates["cp"]

    def label(self) -> str:
        """This rank's coordinates for log lines, e.g. '[pp0 dp1 tp0]'."""
        return f"[pp{self.pp_rank} dp{self.dp_rank} tp{self.tp_rank}]"

    def submesh(self, dims: str | tuple[str, ...]) -> DeviceMesh:
        """The mesh along `dims` (e.g. "tp", or ("dp_replicate", "dp_shard")); distributed
        runs only."""
        return self._distributed_mesh()[dims]

    def group(self, dim: str) -> dist.ProcessGroup:
        """The process group along mesh dim `dim` ("pp", "dp_replicate", "dp_shard", "tp");
        distributed runs only."""
        return self._distributed_mesh().get_group(dim)

    def expert_submesh(self, dims: str | tuple[str, ...]) -> DeviceMesh:
        """The expert mesh along `dims` ("ep", "efsdp", or ("dp_replicate", "efsdp"));
        runs with parallel.ep > 1 only (`build_expert_mesh`)."""
        if self.expert_mesh is None:
            raise RuntimeError("the expert mesh exists only with parallel.ep > 1")
        return self.expert_mesh[dims]

    def _distributed_mesh(self) -> DeviceMesh:
        if self.mesh is None:
            raise RuntimeError(
                "a single-process topology has no device mesh or process groups; ask for "
                "them only along a mesh dim larger than one"
            )
        return self.mesh

    def sum_over_tokens(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a tensor over every rank that sees different tokens: the data-parallel
        ranks and, under context parallelism, the cp ranks (each holds its chunks of the
        replica's sequences), e.g. routed-token counts."""
        total = value.detach().clone()
        group = self.tokens_group()
        if group is not None:
            dist.all_reduce(total, group=group)
        return total

    def tokens_group(self) -> dist.ProcessGroup | None:
        """The one group of the ranks that see different tokens (dp_replicate x dp_shard x
        cp; the flattened "dp_cp" when more than one of them is larger than one), or None
        when this rank is alone in seeing its tokens."""
        larger = [name for name in TOKEN_DIMS if getattr(self.dims, name) > 1]
        if not larger:
            return None
        return self.group(larger[0] if len(larger) == 1 else "dp_cp")

    def mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-replica scalar over all data-parallel ranks (for logging)."""
        if self.dp_size == 1 and self.dims.cp == 1:
            return value
        return self.sum_over_dp(value) / self.dp_size

    def sum_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a per-replica tensor over all data-parallel ranks. Under context
        parallelism each cp rank holds its chunks' value (a mean loss over its tokens), and
        the replica's is their mean, taken first."""
        total = self.sum_over_tokens(value)
        return total / self.dims.cp if self.dims.cp > 1 else total

    def sum_over_world(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a tensor over every rank (one all-reduce on the default group); the
        value itself in one process."""
        total = value.detach().clone()
        if self.is_distributed:
            dist.all_reduce(total)
        return total

    def max_over_world(self, value: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of a tensor over every rank (one all-reduce on the
        default group; `value` on this rank's device); the value itself in one process."""
        result = value.detach().clone()
        if self.is_distributed:
            dist.all_reduce(result, op=dist.ReduceOp.MAX)
        return result

    def broadcast_from_rank0(self, value: T) -> T:
        """Rank 0's `value` on every rank (e.g. the run directory, whose timestamp may differ)."""
        if not self.is_distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        """The pipeline group, or None without pipeline parallelism."""
        return self.group("pp") if self.dims.pp > 1 else None

    def local_rank0_first(self, task: Callable[[], T]) -> T:
        """Run `task` on each node's local rank 0 first, then on the other ranks (which then
        find its results, e.g. prepared data, in place). A ConfigError raised by a first
        runner is raised on every rank, so no rank waits for one that has stopped.

        The other ranks wait in a collective over a gloo group made for it, with
        PREPARATION_TIMEOUT: on the training groups the wait would end after
        `parallel.timeout_s`, and under NCCL its watchdog would kill the job.
        """
        if not self.is_distributed:
            return task()
        first = int(os.environ.get("LOCAL_RANK", 0)) == 0
        results: list[T] = []  # the first runner's result, once it has one
        error = None
        group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
        try:
            if first:
                try:
                    results.append(task())
                except ConfigError as raised:
                    error = str(raised)
            errors: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error, group=group)
        finally:
            dist.destroy_process_group(group)
        reported = next((e for e in errors if e is not None), None)
        if reported is not None:
            raise ConfigError(reported)
        return results[0] if first else task()

    def describe(self) -> str:
        """The layout and mesh order, for the start-of-run log line."""
        backend = dist.get_backend() if self.is_distributed else "none"
        return (
            f"layout {self.dims.describe()} | mesh order {' > '.join(MESH_DIMS)} (tp innermost) "
            f"| backend {backend} | device {self.device}"
        )

    @contextlib.contextmanager
    def errors_labelled(self) -> Iterator[None]:
        """Re-raise any error of this block with this rank's coordinates in front, so a
        collective timeout or a crash on one rank says which rank and group it was."""
        try:
            yield
        except ConfigError:
            raise
        except Exception as error:
            if not self.is_distributed:
                raise
            message = f"rank {self.rank} {self.label()} ({self.groups()}): {error}"
            try:
                labelled = type(error)(message)
            except Exception:  # an exception type that takes other arguments
                labelled = RuntimeError(f"{type(error).__name__}: {message}")
            raise labelled from error

    def groups(self) -> str:
        """The ranks of this rank's groups along each mesh dim larger than one, e.g.
        'dp_shard group [0, 2], tp group [0, 1]': the groups a failing collective ran in."""
        meshes = [] if self.mesh is None else [(name, self.mesh[name]) for name in MESH_DIMS]
        if self.expert_mesh is not None:
            meshes.append(("ep", self.expert_mesh["ep"]))
        return ", ".join(f"{name} group {mesh.mesh.flatten().tolist()}"
                         for name, mesh in meshes if mesh.size() > 1)


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
