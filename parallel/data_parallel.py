"""Data parallelism with FSDP2 (`fully_shard`), one code path for three modes:

    dp_shard > 1, dp_replicate = 1   FSDP (ZeRO-3) over the 1-D "dp_shard" mesh
    dp_shard > 1, dp_replicate > 1   HSDP: shard within a dp_shard group, replicate across
    dp_shard = 1, dp_replicate > 1   plain replication: HSDP with a shard group of one, i.e.
                                     DDP-style gradient all-reduce over "dp_replicate"

Plain replication goes through `fully_shard` on the 2-D (dp_replicate, dp_shard) mesh rather
than DDP because FSDP2 composes with tensor-parallel DTensor parameters (each becomes a
DTensor on the dp x tp mesh) and gives every mode the same gradient DTensors for clipping
and the same state-dict path; one implementation, tested in every mode. Each block is its
own FSDP unit (one all-gather / reduce-scatter per block, overlapped with compute); the
root unit holds the embeddings, final norm and head.

Gradients are averaged over the data-parallel ranks, so a rank's loss is the mean over its
own micro-batches and the result equals the single-process mean over all of them.

Gradient accumulation keeps ZeRO-3's memory (`set_gradient_reduction`): every micro-batch's
backward reduce-scatters its gradients over "dp_shard", so they accumulate as sharded fp32
DTensors (1/dp_shard of the model per rank); only the all-reduce across "dp_replicate"
waits for the last micro-batch (FSDP keeps the pending sum sharded, too). Skipping the
reduce-scatter as well (`set_requires_gradient_sync(False)`, FSDP1's `no_sync`) would keep
an unsharded fp32 gradient of the whole model on every rank until the last micro-batch: 4
bytes per parameter, 27 GB for 7B and 280 GB for 70B, i.e. no gradient sharding at all.
The cost of the safe choice is one reduce-scatter per micro-batch instead of per step,
overlapped with the backward as in any FSDP step. Pipeline stages do the same
(parallel/pipeline.py, `ShardedGradientStage`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from scaleforge.models.moe import MoE
from scaleforge.models.transformer import Transformer
from scaleforge.parallel.expert_parallel import expert_gradient_divisor
from scaleforge.parallel.topology import Topology


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16: compute in bf16 from fp32 sharded master weights, reduce gradients in fp32.
    fp32: no casts."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def data_parallel_mesh_dims(topology: Topology) -> tuple[str, ...]:
    """The mesh dims FSDP spans: ("dp_shard",) or ("dp_replicate", "dp_shard") for HSDP and
    plain replication; with context parallelism "dp_shard_cp" (dp_shard x cp flattened:
    cp ranks hold the same weights, as torchtitan shards them) in place of "dp_shard"."""
    shard = "dp_shard_cp" if topology.dims.cp > 1 else "dp_shard"
    if topology.dims.dp_replicate > 1:
        return ("dp_replicate", shard)
    return (shard,)


def uses_data_parallel(topology: Topology) -> bool:
    """Whether FSDP wraps the model: more than one data-parallel or context-parallel rank."""
    return topology.dp_size * topology.dims.cp > 1


def apply_data_parallel(
    model: Transformer, topology: Topology, precision: str, reshard_after_forward: bool = True
) -> None:
    """`fully_shard` each block of `model.layers`, then the root, over the data-parallel mesh.

    With a shard group of one (plain replication) nothing is gathered, so weights are never
    resharded. The root is not resharded after forward: its head runs first in backward (and
    `Transformer.loss` runs the head after the body's forward, on the weight still gathered).
    Experts sharded by expert parallelism are their own FSDP unit inside their block
    (`_shard_experts`).
    """
    mesh = topology.submesh(data_parallel_mesh_dims(topology))
    reshard = reshard_after_forward and topology.dims.dp_shard * topology.dims.cp > 1
    policy = mixed_precision_policy(precision)
    for block in model.layers.values():
        if topology.expert_mesh is not None:
            _shard_experts(block, topology, policy, reshard)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def _shard_experts(block: nn.Module, topology: Topology, policy: MixedPrecisionPolicy,
                   reshard: bool) -> None:
    """`fully_shard` the experts of `block`'s MoE layer, already sharded over "ep", over the
    expert mesh's "efsdp" (with "dp_replicate": HSDP) as torchtitan does. Their gradient
    is summed (the ep group's tokens by all-to-all, the rest by FSDP) and divided by
    `expert_gradient_divisor`: a sum reduction then a division, which every backend runs
    (FSDP would reduce-scatter with NCCL's pre-multiplied sum, which gloo lacks). With an
    efsdp of one FSDP divides without a reduce-scatter, and (torch 2.13) a forced sum
    would divide a second time, so the sum is forced only over more ranks.

    FSDP shards dim 0 (experts) when efsdp divides this rank's experts, else dim 1 (each
    expert's rows, as torchtitan does): fewer experts than efsdp ranks on dim 0 would leave
    some ranks padding and others whole experts (Mixtral's 8 at ep 8 x efsdp 4: no saving).
    """
    dims = ("dp_replicate", "efsdp") if topology.dims.dp_replicate > 1 else "efsdp"
    mesh = topology.expert_submesh(dims)
    efsdp = topology.expert_submesh("efsdp").size()
    ep = topology.expert_submesh("ep").size()
    for module in block.modules():
        if isinstance(module, MoE):
            dim = 0 if (module.num_experts // ep) % efsdp == 0 else 1

            def placement(_: nn.Parameter, dim: int = dim) -> Shard:
                return Shard(dim)

            experts = fully_shard(module.experts, mesh=mesh, mp_policy=policy,
                                  reshard_after_forward=reshard, shard_placement_fn=placement)
            experts.set_gradient_divide_factor(expert_gradient_divisor(topology))
            experts.set_force_sum_reduction_for_comms(efsdp > 1)


def autocast_precision(precision: str, topology: Topology) -> str:
    """The precision autocast should add on top of the sharding: under FSDP, bf16 is the
    MixedPrecisionPolicy's job (weights gathered in bf16), so autocast stays off (fp32)."""
    if precision == "bf16" and uses_data_parallel(topology):
        return "fp32"
    return precision


def set_gradient_reduction(model: nn.Module, last_micro_batch: bool) -> None:
    """Before a micro-batch's backward: reduce-scatter its gradients over "dp_shard" (always,
    so they accumulate sharded) and all-reduce them over "dp_replicate" only when
    `last_micro_batch` (module doc); a no-op on a model without FSDP."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(last_micro_batch)
