"""Context parallelism (`parallel.cp`): each sequence split over the cp group, attention
over the whole sequence by all-gathering keys and values (Llama 3's design).

Layout. Rank r of the N cp ranks holds chunks r and 2N-1-r of each sequence's 2N chunks
(models/sequence_shard.py), which balances causal attention work. Every cp rank of a
data-parallel replica reads the same sequences (the loaders are keyed by the data-parallel
rank, which cp does not change) and keeps its chunks of the inputs and targets
(`batch_columns`, given to `data_pipeline.batch.step_batch`); document ids stay whole, for
the attention mask over all keys.

Contract of the all-gather (`gather_sequence`): forward all-gathers a (B, heads, T / N, hd)
tensor over the cp group into (B, heads, T, hd), the ranks' parts in rank order; backward
reduce-scatters the gradient (summed over the ranks whose queries read each key) back to
the rank that owns it. Only K and V travel, with their kv heads (few under grouped-query
attention; under tensor parallelism this rank's heads only); queries, the MLP and the loss
stay local. Parameters are the same on every cp rank and are sharded by FSDP over
dp_shard x cp (parallel/data_parallel.py), so the gradient average over that group adds
the cp ranks' chunk gradients the way it adds replicas' micro-batches.

Attention: each attention module's kernel is wrapped in the `parallel.cp_impl` kernel
(`CP_KERNELS`): allgather (parallel/allgather_attention.py: the above; any device, every
mask) or torch (parallel/torch_cp_attention.py: torch's context-parallel SDPA; CUDA, plain
causal attention only). The model is given its tokens' global positions (RoPE, GPT's learned
positions) by a forward pre-hook; it knows nothing else of the split.

Loss and counts: each rank's loss is the mean over its T / N tokens of each sequence; the
mean over the cp ranks (`collectives.mean_over_dp_and_cp`, and the world mean of
`core.health.agree_on_step`) is the mean over every token once, since all chunks are equal.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from scaleforge.models.attention import AttentionKernel, AttentionRun
from scaleforge.models.attention.kernel import check_kernel
from scaleforge.models.config import TransformerConfig
from scaleforge.models.sequence_shard import head_tail_chunks, head_tail_positions
from scaleforge.models.transformer import Transformer
from scaleforge.parallel.allgather_attention import AllGatherKernel
from scaleforge.parallel.cp_attention import ContextParallelKernel
from scaleforge.parallel.topology import ParallelDims, Topology
from scaleforge.parallel.torch_cp_attention import TorchCPKernel

# The parallel.cp_impl choices: how an attention module attends over the cp group.
CP_KERNELS: dict[str, type[ContextParallelKernel]] = {
    "allgather": AllGatherKernel,
    "torch": TorchCPKernel,
}


def apply_context_parallel(model: Transformer, topology: Topology,
                           impl: str = "allgather") -> None:
    """Make `model` (or a pipeline stage) run on this rank's chunks of each sequence: wrap
    the kernel of each attention module in the `impl` kernel (`parallel.cp_impl`) and give
    forward the chunks' global positions; a no-op without context parallelism. Apply after
    tensor parallelism (whose pre-hook makes a later stage's input whole on its sequence)."""
    if topology.dims.cp == 1:
        return
    wrap = CP_KERNELS[impl].wrapper(topology)
    for module in model.modules():
        kernel = getattr(module, "kernel", None)
        if isinstance(kernel, AttentionKernel):
            setattr(module, "kernel", wrap(kernel))  # noqa: B010 (an nn.Module's attribute)
    model.register_forward_pre_hook(
        partial(_global_positions, rank=topology.coordinates["cp"], size=topology.dims.cp),
        with_kwargs=True)


def _global_positions(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                      rank: int, size: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Pass forward the global positions (T / N,) of this rank's chunks of sequences of T,
    having checked T against the model's max_seq_len."""
    local: torch.Tensor = args[0]  # tokens (B, T / N) or a stage's hidden states
    total = local.size(1) * size
    assert isinstance(module, Transformer)
    module.check_length(total)
    return args, {**kwargs, "positions": head_tail_positions(total, rank, size, local.device)}


def check_cp_impl(cp_impl: str, dims: ParallelDims, model: TransformerConfig,
                  document_masking: bool, device_type: str) -> None:
    """Raise ConfigError (one line, with the fix) where the `parallel.cp_impl` kernel cannot
    run this layout (asked of the kernel: its devices, masks)."""
    if dims.cp == 1:
        return
    run = AttentionRun(device_type=device_type, grouped_query=model.kv_heads != model.n_heads,
                       sliding_window=model.sliding_window, document_masking=document_masking,
                       cp=dims.cp)
    check_kernel(CP_KERNELS, cp_impl, run, "parallel.cp_impl")


def batch_columns(topology: Topology, seq_len: int) -> tuple[slice, slice] | None:
    """The two ranges of positions of this rank's chunks in each sequence of `seq_len`
    tokens, to cut them out of a batch; None without context parallelism."""
    if topology.dims.cp == 1:
        return None
    return head_tail_chunks(seq_len, topology.coordinates["cp"], topology.dims.cp)
