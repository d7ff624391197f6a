"""Context parallelism (`parallel.cp`): each sequence split over the cp group, attention
over the whole sequence by all-gathering keys and values (Llama 3's design).

Layout. Rank r of the N cp ranks holds chunks r and 2N-1-r of each sequence's 2N chunks
(models/sequence_shard.py), which balances causal attention work. Every cp rank of a
data-parallel replica reads the same sequences (the loaders are keyed by the data-parallel
rank, which cp does not change) and keeps its chunks of the inputs and targets
(`batch_columns`, given to `data_pipeline.pack.split_batch`); document ids stay whole, for
the attention mask over all keys.

Contract of the all-gather (`gather_sequence`): forward all-gathers a (B, heads, T / N, hd)
tensor over the cp group into (B, heads, T, hd), the ranks' parts in rank order; backward
reduce-scatters the gradient (summed over the ranks whose queries read each key) back to
the rank that owns it. Only K and V travel, with their kv heads (few under grouped-query
attention; under tensor parallelism this rank's heads only); queries, the MLP and the loss
stay local. Parameters are the same on every cp rank and are sharded by FSDP over
dp_shard x cp (parallel/data_parallel.py), so the gradient average over that group adds
the cp ranks' chunk gradients the way it adds replicas' micro-batches.

Implementations (`parallel.cp_impl`): allgather (the above; any device, every mask) or torch:
plain causal layers call torch's context-parallel SDPA instead
(torch.distributed.tensor.experimental; its head-tail load balancing is this layout: rank r
holds chunks r and 2N-1-r), which passes the K/V shards round the cp group by all-to-all
(`set_rotate_method("alltoall")`) and merges the partial results. It has no CPU kernel and
takes no mask, so it needs CUDA and refuses documents and sliding windows
(`check_cp_impl`). Its ring calls the CUDA kernels SDPA picks, and the memory-efficient one
(fp32) takes equal head counts: K and V are repeated to the query heads before the call
(n_heads / n_kv_heads times the traffic of the kv heads alone).

Loss and counts: each rank's loss is the mean over its T / N tokens of each sequence; the
mean over the cp ranks (`Topology.sum_over_dp`, and the world mean of
`core.health.agree_on_step`) is the mean over every token once, since all chunks are equal.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from scaleforge.errors import ConfigError
from scaleforge.models.chunked_attention import repeat_kv
from scaleforge.models.config import TransformerConfig
from scaleforge.models.sequence_shard import RingAttention, SequenceShard, head_tail_chunks
from scaleforge.models.transformer import Transformer
from scaleforge.parallel.sequence_collectives import gather_sequence
from scaleforge.parallel.topology import ParallelDims, Topology


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
    """`SequenceShard.ring` for parallel.cp_impl=torch over the cp `mesh`: turns on torch's
    context-parallel SDPA for DTensors sharded by sequence (for the whole process) and its
    all-to-all rotation of the K/V shards."""
    # Imported here: a private module of torch, needed on CUDA only.
    from torch.distributed.tensor.experimental._attention import (
        _enable_context_parallel_dispatcher,
        set_rotate_method,
    )

    _enable_context_parallel_dispatcher()
    set_rotate_method("alltoall")
    return partial(_torch_ring_attention, mesh=mesh)


def apply_context_parallel(model: Transformer, topology: Topology,
                           impl: str = "allgather") -> None:
    """Make `model` (or a pipeline stage) run on this rank's chunks of each sequence, with
    attention over the cp group's keys and values (`impl`: the `parallel.cp_impl` setting);
    a no-op without context parallelism."""
    if topology.dims.cp == 1:
        return
    ring = torch_ring_attention(topology.submesh("cp")) if impl == "torch" else None
    model.sequence_shard = SequenceShard(topology.coordinates["cp"], topology.dims.cp,
                                         partial(gather_sequence, group=topology.group("cp")),
                                         ring)


def check_cp_impl(cp_impl: str, dims: ParallelDims, model: TransformerConfig,
                  document_masking: bool, device_type: str) -> None:
    """Raise ConfigError (one line, with the fix) where `parallel.cp_impl` = torch cannot run
    this layout: off CUDA, or with attention that needs a mask."""
    if dims.cp == 1 or cp_impl != "torch":
        return
    if device_type != "cuda":
        raise ConfigError(
            f"parallel.cp_impl=torch runs on CUDA only (torch's context-parallel SDPA has no "
            f"CPU kernel) and this run's device is {device_type}; set parallel.cp_impl=allgather"
        )
    if document_masking or model.sliding_window is not None:
        masked = ("data.document_masking=true" if document_masking
                  else f"model.sliding_window={model.sliding_window}")
        raise ConfigError(
            f"parallel.cp_impl=torch with {masked}: torch's context-parallel SDPA takes no "
            "mask; set parallel.cp_impl=allgather (it masks by global position)"
        )


def batch_columns(topology: Topology, seq_len: int) -> tuple[slice, slice] | None:
    """The two ranges of positions of this rank's chunks in each sequence of `seq_len`
    tokens, to cut them out of a batch; None without context parallelism."""
    if topology.dims.cp == 1:
        return None
    return head_tail_chunks(seq_len, topology.coordinates["cp"], topology.dims.cp)
