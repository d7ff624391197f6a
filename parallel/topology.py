"""The process layout and this process's place in it: the mesh and its coordinates.

    world = pp x dp_replicate x dp_shard x cp x tp       (Megatron order, tp innermost)

`ParallelDims` holds the sizes (`parallel.layout.check_layout` validates them before any
process group exists); `Topology` holds one DeviceMesh with the named dims ("pp",
"dp_replicate", "dp_shard", "cp", "tp"), every dim present, size-1 ones included, so
`topology.mesh["tp"]` always exists; with context parallelism it also has the flattened dim
"dp_shard_cp" that FSDP shards over, and when more than one of dp_replicate, dp_shard and
cp is larger than one, the flattened dim "dp_cp" over all three (the ranks that see
different tokens: one group, `tokens_group`). With expert parallelism (parallel.ep > 1) a
second mesh over the same ranks, `Topology.expert_mesh` ("pp", "dp_replicate", "efsdp",
"ep", "tp"), cuts dp_shard x cp into efsdp x ep. In a single process no group exists and
the mesh is None: the single-process path runs exactly as without this module.

Starting a run (torch.distributed, the meshes, the device) is parallel/run_setup.py's; the
reductions over the layout's ranks are parallel/collectives.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# The dims whose ranks see different tokens (flattened as "dp_cp" when two or more are > 1).
TOKEN_DIMS = ("dp_replicate", "dp_shard", "cp")


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

    Single process (world size 1): `mesh` is None and every collective
    (parallel/collectives.py) is a no-op.
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

    def tokens_group(self) -> dist.ProcessGroup | None:
        """The one group of the ranks that see different tokens (dp_replicate x dp_shard x
        cp; the flattened "dp_cp" when more than one of them is larger than one), or None
        when this rank is alone in seeing its tokens."""
        larger = [name for name in TOKEN_DIMS if getattr(self.dims, name) > 1]
        if not larger:
            return None
        return self.group(larger[0] if len(larger) == 1 else "dp_cp")

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        """The pipeline group, or None without pipeline parallelism."""
        return self.group("pp") if self.dims.pp > 1 else None

    def describe(self) -> str:
        """The layout and mesh order, for the start-of-run log line."""
        backend = dist.get_backend() if self.is_distributed else "none"
        return (
            f"layout {self.dims.describe()} | mesh order {' > '.join(MESH_DIMS)} (tp innermost) "
            f"| backend {backend} | device {self.device}"
        )

    def groups(self) -> str:
        """The ranks of this rank's groups along each mesh dim larger than one, e.g.
        'dp_shard group [0, 2], tp group [0, 1]': the groups a failing collective ran in."""
        meshes = [] if self.mesh is None else [(name, self.mesh[name]) for name in MESH_DIMS]
        if self.expert_mesh is not None:
            meshes.append(("ep", self.expert_mesh["ep"]))
        return ", ".join(f"{name} group {mesh.mesh.flatten().tolist()}"
                         for name, mesh in meshes if mesh.size() > 1)
