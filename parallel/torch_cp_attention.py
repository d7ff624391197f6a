"""Context-parallel attention by torch's context-parallel SDPA (`parallel.cp_impl=torch`;
torch.distributed.tensor.experimental): its head-tail load balancing is this layout (rank r
holds chunks r and 2N-1-r), and it passes the K/V shards round the cp group by all-to-all
(`set_rotate_method("alltoall")`) and merges the partial results. It has no CPU kernel and
takes no mask, so it runs on CUDA only and refuses documents and sliding windows (its
`supports`). Its ring calls the CUDA kernels SDPA picks, and the memory-efficient one (fp32)
takes equal head counts: K and V are repeated to the query heads before the call
(n_heads / n_kv_heads times the traffic of the kv heads alone).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from scaleforge.models.attention import AttentionKernel, Supports
from scaleforge.models.chunked_attention import repeat_kv
from scaleforge.parallel.cp_attention import ContextParallelKernel
from scaleforge.parallel.topology import Topology
from scaleforge.torch_compat import enable_torch_context_parallel

# (q, k, v) of this rank's chunks -> this rank's rows of causal attention over the group.
RingAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TorchCPKernel(ContextParallelKernel):
    """`ring`: `torch_ring_attention` over the cp mesh."""

    name = "torch"
    supports = Supports(devices=("cuda",), sliding_window=False, documents=False,
                        context_parallel=True)

    def __init__(self, inner: AttentionKernel, rank: int, size: int, ring: RingAttention):
        super().__init__(inner, rank, size)
        self.ring = ring

    @classmethod
    def wrapper(cls, topology: Topology) -> Callable[[AttentionKernel], AttentionKernel]:
        return partial(cls, rank=topology.coordinates["cp"], size=topology.dims.cp,
                       ring=torch_ring_attention(topology.submesh("cp")))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: None) -> torch.Tensor:
        return self.ring(q, k, v)


def _torch_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mesh: DeviceMesh) -> torch.Tensor:
    """Causal attention of this rank's chunks q (B, n_heads, T / N, hd) over every rank's
    k, v (B, n_kv_heads, T / N, hd) by torch's context-parallel SDPA over `mesh` (the cp
    group); returns this rank's rows (B, n_heads, T / N, hd)."""
    heads = q.size(1)
    k, v = (repeat_kv(t, heads) for t in (k, v))
    q, k, v = (DTensor.from_local(t, mesh, [Shard(2)], run_check=False) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert isinstance(out, DTensor), "torch's context-parallel SDPA returns a DTensor"
    return out.to_local()


def torch_ring_attention(mesh: DeviceMesh) -> RingAttention:
    """The ring attention over the cp `mesh`: turns on torch's context-parallel SDPA for
    DTensors sharded by sequence (for the whole process) and its all-to-all rotation of the
    K/V shards."""
    enable_torch_context_parallel("alltoall")
    return partial(_torch_ring_attention, mesh=mesh)
