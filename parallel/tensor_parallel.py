"""Tensor + sequence parallelism (Megatron's split) as DTensor plans over the "tp" mesh dim.

Layouts through a block, for a tp group of size t (B batch, T sequence, d model width):

    residual stream h        DTensor (B, T, d)  Shard(1): each rank holds T/t positions
    attention_norm, ffn_norm SequenceParallel: norm of the local positions; weights Replicate,
                             so their gradients are Partial(sum) over tp, all-reduced
                             when the optimizer or the clipping reads them
    attention, feed_forward  input all-gathered on T (Shard(1) -> Replicate)
    wq, wk, wv, w1, w3       ColwiseParallel: weight Shard(0) (heads / MLP columns), q/k/v
                             biases Shard(0) alike; output local (B, T, width/t); heads are
                             read from the local width
    q_norm, k_norm (qk_norm) RMSNorm over each local head (B, T, heads/t, hd), wrapped as a
                             DTensor Shard(2) on the heads; weights Replicate, gradients
                             Partial(sum) over tp like the sequence-parallel norms; output
                             local again
    wo, w2                   RowwiseParallel: weight Shard(1), output reduce-scattered on T
                             -> Shard(1) (forward reduce-scatter, backward all-gather)
    tok_embeddings           vocab-parallel: weight Shard(0) by vocabulary rows, output
                             reduce-scattered on T -> Shard(1)
    pos_embeddings (gpt)     position rows Shard(0); output (T, d) reduce-scattered on T ->
                             Shard(0), added to h's Shard(1) by broadcasting
    feed_forward (MoE)       parallel.etp=1: not split (models/moe.py): input all-gathered
                             on T as a local tensor, every tp rank routes the same tokens
                             (router and experts replicated over tp, or the experts sharded
                             by expert parallelism), output cut to
                             this rank's T/t positions -> Shard(1) (backward: all-gather).
                             parallel.etp=tp: experts split by width, output reduce-scattered
                             on T (parallel/expert_tensor_parallel.py)
    norm                     SequenceParallel
    output (LM head)         ColwiseParallel by vocabulary: input all-gathered on T, logits
                             kept sharded on V -> DTensor (B, T, V) Shard(2); the loss runs
                             on the shards (models/loss.py), never gathering V

The residual stream stays a DTensor (not a local tensor) so `h.size(1)` is the full
sequence length the model uses for RoPE tables and positions. Between pipeline stages it
travels as this rank's local shard (B, T/t, d) (the schedules send plain tensors): a stage
without the head hands out `to_local()`, a stage without the embeddings wraps what it
receives back into a Shard(1) DTensor; the sending and receiving rank share the tp index.
Tied embeddings (gpt) work: the embedding and the LM head are both sharded by vocabulary
rows, so after the plan the head is re-tied to the embedding's sharded weight.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from scaleforge.models.config import TransformerConfig
from scaleforge.models.family import family_spec
from scaleforge.models.moe import MoE
from scaleforge.models.transformer import Transformer
from scaleforge.parallel.expert_tensor_parallel import MoETensorParallel
from scaleforge.parallel.tp_styles import GatherSequence, ReplicateParallel


def block_style(name: str, expert_tp: bool = False) -> ParallelStyle:
    """The DTensor style a family's plan names (models/family.TP_STYLES): Megatron's
    column/row split, sequence-parallel norms, the block input all-gathered on the sequence,
    per-head norms, replicated modules and the MoE feed-forward (split by width under
    `expert_tp`)."""
    if name == "sequence_parallel":
        return SequenceParallel()
    if name == "gather_sequence":
        return GatherSequence()
    if name == "colwise":
        return ColwiseParallel()
    if name == "rowwise":
        return RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
    if name == "head_norm":
        return SequenceParallel(sequence_dim=2, use_local_output=True)
    if name in ("replicate", "replicate_local"):
        return ReplicateParallel(local_output=name == "replicate_local")
    if name == "moe":
        return MoETensorParallel(split=expert_tp)
    raise ValueError(f"unknown tensor-parallel style {name!r}; models/family.py lists them")


def block_plan(cfg: TransformerConfig, moe: bool = False,
               expert_tp: bool = False) -> dict[str, ParallelStyle]:
    """The TP/SP plan of one transformer block, module path -> style, from the family's
    plan (models/<family>/). A MoE feed-forward (models/moe.py) takes the whole sequence as
    a local tensor; its experts are not split and its output is cut to this rank's sequence
    shard (backward: all-gathered), or, with `expert_tp` (parallel.etp = tp), its experts
    are split by width and its partial output reduce-scattered
    (parallel/expert_tensor_parallel.py)."""
    names = family_spec(cfg.family).tp_plan(cfg, moe)
    return {path: block_style(name, expert_tp) for path, name in names.items()}


def outer_plan(model: Transformer) -> dict[str, ParallelStyle]:
    """The plan of the modules around the blocks that this model (or pipeline stage) owns."""
    plan: dict[str, ParallelStyle] = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
        )
    if model.pos_embeddings is not None and model.tok_embeddings is not None:
        plan["pos_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(0), use_local_output=False
        )
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False
        )
    return plan


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh,
                          expert_tp: bool = False) -> None:
    """Shard `model` (a Transformer or a pipeline stage of one) over `tp_mesh` in place;
    `expert_tp` splits the MoE layers' experts too (parallel.etp = tp).

    Every parameter becomes a DTensor on `tp_mesh`; the model's output is a DTensor of
    logits sharded on the vocabulary (models/loss.py computes the loss on the shards), or the
    hidden states sharded on the sequence for a stage without the head.
    """
    parallelize_module(model, tp_mesh, outer_plan(model))
    if model.cfg.tie_embeddings and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight
    for block in model.layers.values():
        moe = isinstance(block.feed_forward, MoE)
        plan = block_plan(model.cfg, moe, expert_tp)
        parallelize_module(block, tp_mesh, plan)
    if model.tok_embeddings is None:  # a later pipeline stage: receives local shards
        model.register_forward_pre_hook(partial(_sequence_shard_to_dtensor, tp_mesh))
    if model.output is None:  # an earlier pipeline stage: sends local shards
        model.register_forward_hook(_dtensor_to_local)


def _sequence_shard_to_dtensor(
    tp_mesh: DeviceMesh, module: nn.Module, args: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    """Hidden states (B, T/t, d) from the previous stage -> DTensor (B, T, d) Shard(1)."""
    return (DTensor.from_local(args[0], tp_mesh, [Shard(1)]), *args[1:])


def _dtensor_to_local(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The stage's sequence-sharded hidden states as a plain local tensor (B, T/t, d)."""
    return output.to_local() if isinstance(output, DTensor) else output
