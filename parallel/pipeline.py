"""Pipeline parallelism: cut a built Transformer into stages, run them with a schedule from
`torch.distributed.pipelining`, and report the loss and the global gradient norm on every
pipeline rank.

Stage layout. The model's `n_layers` are cut into `pp x stages_per_rank` contiguous stages;
stage 0 also owns the embeddings, the last stage the final norm and the LM head. Which rank
runs which stage depends on the schedule:
- "loop" (GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble): rank r owns r, r+p, r+2p, ...
- "v" (ZBVZeroBubble, DualPipeV): rank r owns r and 2p-1-r, so rank 0 holds both ends.

A stage module is the full model with every module it does not own deleted (set to None or
dropped from `layers`), so its parameter names (FQNs) are those of the full model and
checkpoints, the tensor-parallel plan and FSDP address the same weights in every layout.

Loss scaling. The single-process trainer backpropagates `loss / micro_batches` for every
micro-batch. The schedules here are built with `scale_grads=False` and a loss function that
divides by the micro-batch count itself, so each micro-batch's backward is seeded with the
same 1/m as in one process (torch's default, scale_grads=True, would instead divide the
summed gradients once at the end: equal in exact arithmetic, different in rounding).

Gradient accumulation with FSDP. torch 2.13's stage runs every micro-batch's backward with
FSDP's gradient sync and resharding off and reduce-scatters once, in the schedule's closing
`perform_reduce_grad`: until then a rank would keep an unsharded fp32 gradient of its stages
(1/pp of the model instead of 1/(pp x dp_shard)). `ShardedGradientStage` reduce-scatters
with every full backward instead, as the trainer does without a pipeline
(parallel/data_parallel.py); the zero-bubble schedules' split backward keeps torch's path.

Document ids (per-document attention): every pp rank holds the step's micro-batches, so
each passes their document ids to `schedule.step` / `schedule.eval` as the keyword argument
`document_ids`; torch 2.13's schedules split keyword arguments into micro-batches like the
inputs and hand them to every stage of the rank (`PipelineStage.forward_one_chunk`), so
each stage is called `stage(inputs or hidden states, document_ids=<its micro-batch's ids>)`
and nothing but hidden states travels between stages.

Use from a training loop (every pp rank passes the same micro-batches; the rules, checked
before start, and the theoretical bubble are in parallel/pipeline_schedules.py):
    validate_pipeline(cfg.model, pp, schedule, stages_per_rank, micro_batches)  # at start
    pipe = build_pipeline(model, pp_mesh, schedule, stages_per_rank, micro_batches,
                          cross_entropy, device)
    optimizer = build_optimizer(pipe.model_parts, ...)
    loss = pipeline_step(pipe, micro_batches)                # mean loss, on every pp rank
    norm = parallel.grad_clip.clip_grad_norm(pipe.parameters(), max_norm, pp_group)
    val_loss = pipeline_eval(pipe, val_micro_batches)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import schedules as torch_schedules
from torch.distributed.tensor import DTensor

from scaleforge.models.moe import statistics_paused
from scaleforge.models.transformer import Transformer
from scaleforge.parallel.data_parallel import set_gradient_reduction
from scaleforge.parallel.dtensor import full_value
from scaleforge.parallel.pipeline_rules import eval_batches_per_rank
from scaleforge.parallel.pipeline_schedules import (
    SCHEDULES,
    check_stages_per_rank,
    check_tied_embeddings,
    schedule_spec,
    stage_indices,
    stage_layer_ranges,
    validate_pipeline,
)
from scaleforge.torch_compat import PipelineStage, stage_backward

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MicroBatch(Protocol):
    """What the schedule reads of a micro-batch (data_pipeline's `Batch`): inputs and
    targets, each (micro_batch_size, T) int64, and document ids of the same shape or None."""

    @property
    def inputs(self) -> torch.Tensor: ...

    @property
    def targets(self) -> torch.Tensor: ...

    @property
    def document_ids(self) -> torch.Tensor | None: ...


def cut_stage(model: Transformer, stage: int, num_stages: int, layers: range) -> Transformer:
    """A module that runs stage `stage` of `num_stages`: `model` without the layers outside
    `layers`, without embeddings unless stage 0, without norm + head unless the last stage.

    Parameters and buffers are shared with `model`, not copied (a deepcopy with them in the
    memo), so the stage's weights are exactly the full model's and no memory is spent twice.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    part = copy.deepcopy(model, memo)
    if stage != 0:
        part.tok_embeddings = None
        part.pos_embeddings = None
    if stage != num_stages - 1:
        part.norm = None
        part.output = None
    for name in list(part.layers.keys()):
        if int(name) not in layers:
            del part.layers[name]
    return part


def split_model(
    model: Transformer,
    pp_rank: int,
    pp: int,
    schedule: str,
    stages_per_rank: int,
    layers_per_stage: Sequence[int] | None = None,
) -> list[tuple[int, Transformer]]:
    """(global stage index, stage module) for each stage pipeline rank `pp_rank` runs.

    `model` is the full model, built with the run's seed (or on meta, to be materialised
    after cutting), so stage weights equal the single-process weights.
    """
    spec = schedule_spec(schedule)
    check_stages_per_rank(schedule, spec, stages_per_rank)
    check_tied_embeddings(model.cfg, pp, spec.layout)
    num_stages = pp * stages_per_rank
    ranges = stage_layer_ranges(model.cfg.n_layers, num_stages, layers_per_stage)
    return [
        (index, cut_stage(model, index, num_stages, ranges[index]))
        for index in stage_indices(pp_rank, pp, stages_per_rank, spec.layout)
    ]


def _unique_parameters(modules: Sequence[nn.Module]) -> Iterator[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    for module in modules:
        for name, param in module.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param


class ShardedGradientStage(PipelineStage):
    """A PipelineStage whose full backward passes keep FSDP's gradients sharded.

    For a stage module under FSDP, each full backward reduce-scatters its gradients over
    dp_shard and all-reduces them over dp_replicate only on the stage's last micro-batch
    (`set_gradient_reduction`), where torch's stage turns the sync off until the step's
    end (module doc). FSDP's end-of-backward bookkeeping stays with the schedule's
    `perform_reduce_grad`, which then finds every gradient already reduced. The split
    backward of the zero-bubble schedules (input, then weight) and stages without FSDP take
    torch's path unchanged.
    """

    def shape_inference(self) -> contextlib.AbstractContextManager[None]:
        """torch's first-step shape inference runs the stage on stand-in tensors: MoE
        layers must not count those as routed tokens (models/moe.py)."""
        return statistics_paused(self.submod)

    def backward_maybe_with_nosync(
        self, backward_type: str, bwd_kwargs: dict, last_backward: bool = False
    ) -> tuple[tuple[torch.Tensor | None, ...], list[dict] | None]:
        """Run one micro-batch's backward of this stage; returns (input gradients, None)."""
        if backward_type != "full" or not isinstance(self.submod, FSDPModule):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        self.submod.set_is_last_backward(False)
        set_gradient_reduction(self.submod, last_backward)
        grads = stage_backward(
            bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"]
        )
        return grads, None


class Pipeline:
    """This rank's stages of a pipelined model and the schedule that runs them.

    `model_parts` (an nn.ModuleList of stage modules) is what an optimizer, activation
    checkpointing or FSDP should be applied to; `named_parameters` yields full-model FQNs.
    """

    def __init__(
        self,
        stages: list[tuple[int, Transformer]],
        schedule_name: str,
        group: dist.ProcessGroup,
        micro_batches: int,
        loss_fn: LossFn,
        device: torch.device,
    ):
        self.schedule_name = schedule_name
        self.group = group
        self.micro_batches = micro_batches
        self.stage_ids = [index for index, _ in stages]
        self.model_parts = nn.ModuleList([module for _, module in stages])
        self.pp = dist.get_world_size(group)
        num_stages = self.pp * len(stages)
        self.is_first = 0 in self.stage_ids
        self.is_last = num_stages - 1 in self.stage_ids
        self.device = device
        self.loss_fn = loss_fn
        self.layout = SCHEDULES[schedule_name].layout
        # group rank that runs each global stage, for the forward-only path of pipeline_eval
        self.stage_owner = {
            index: rank
            for rank in range(self.pp)
            for index in stage_indices(rank, self.pp, len(stages), self.layout)
        }
        self.stages = [
            ShardedGradientStage(module, index, num_stages, device, group=group)
            for index, module in stages
        ]

        def scaled_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            # 1/m per micro-batch, exactly as the single-process accumulation (module doc).
            return loss_fn(output, target) / micro_batches

        spec = SCHEDULES[schedule_name]
        schedule_class = getattr(torch_schedules, spec.torch_class)
        self.schedule = schedule_class(
            self.stages if spec.multi_stage else self.stages[0],
            n_microbatches=micro_batches,
            loss_fn=scaled_loss,
            scale_grads=False,
        )

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(full-model FQN, parameter) of this rank's stages; a tied weight appears once."""
        return _unique_parameters(list(self.model_parts))

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters, each once."""
        return (param for _, param in self.named_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's share of the full model's state dict, keyed by full-model FQN."""
        merged: dict[str, torch.Tensor] = {}
        for module in self.model_parts:
            merged.update(module.state_dict())
        return merged


def _pp_group(pp_mesh: DeviceMesh | dist.ProcessGroup) -> dist.ProcessGroup:
    if isinstance(pp_mesh, DeviceMesh):
        if pp_mesh.ndim != 1:
            raise ValueError(f"expected the 1-D pipeline mesh, got a {pp_mesh.ndim}-D mesh")
        return pp_mesh.get_group()
    return pp_mesh


def build_pipeline(
    model: Transformer,
    pp_mesh: DeviceMesh | dist.ProcessGroup,
    schedule: str,
    stages_per_rank: int,
    micro_batches: int,
    loss_fn: LossFn,
    device: torch.device | str,
    layers_per_stage: Sequence[int] | None = None,
    prepare_stage: Callable[[Transformer], None] | None = None,
) -> Pipeline:
    """Cut `model` into this rank's stages and build `schedule` over them (the one place a
    `Pipeline` is made).

    model: the full model, initialised with the run's seed (weights equal single-process).
    pp_mesh: the pipeline axis, a 1-D DeviceMesh or its process group; pp = its size.
    micro_batches: micro-batches per optimizer step (>= pp x stages_per_rank).
    loss_fn(logits (B, T, V), targets (B, T)) -> mean loss over the micro-batch, a scalar.
    prepare_stage(stage): applied in place to each stage module before the schedule is built
    (parallel.parallelize passes tensor parallel, activation checkpointing, compile, FSDP).
    Raises ConfigError (see validate_pipeline) for an invalid combination.
    """
    group = _pp_group(pp_mesh)
    pp, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    validate_pipeline(model.cfg, pp, schedule, stages_per_rank, micro_batches, layers_per_stage)
    stages = split_model(model, pp_rank, pp, schedule, stages_per_rank, layers_per_stage)
    del model  # the layers of other ranks' stages are freed when the caller holds none
    if prepare_stage is not None:
        for _, stage in stages:
            prepare_stage(stage)
    return Pipeline(stages, schedule, group, micro_batches, loss_fn, torch.device(device))


def _on_device(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """`tensors` concatenated along dim 0 on `device`; each is copied with non_blocking, so
    pinned batches (the loaders pin them on CUDA) do not wait for the device."""
    return torch.cat([t.to(device, non_blocking=True) for t in tensors])


def _document_kwargs(pipeline: Pipeline, micro_batches: Sequence[MicroBatch]
                     ) -> dict[str, torch.Tensor]:
    """The schedule's keyword arguments for this rank's stages: the micro-batches' document
    ids concatenated (the schedule splits them like the inputs), when they have them."""
    if micro_batches[0].document_ids is None:
        return {}
    documents = [b.document_ids for b in micro_batches if b.document_ids is not None]
    assert len(documents) == len(micro_batches), "every micro-batch or none has ids"
    return {"document_ids": _on_device(documents, pipeline.device)}


def pipeline_step(pipeline: Pipeline, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
    """Forward and backward of one optimizer step over `micro_batches` (`MicroBatch`: inputs,
    targets, document ids or None), each (micro_batch_size, T) int64; gradients accumulate
    into the stage parameters.

    Every pipeline rank passes the same micro-batches (only the first stage reads inputs,
    every stage its document ids, only the last reads targets). Returns the mean loss over the
    micro-batches (the same number the single-process trainer reports) as a 0-dim fp32
    tensor on every pp rank.
    """
    if len(micro_batches) != pipeline.micro_batches:
        raise ValueError(
            f"pipeline_step got {len(micro_batches)} micro-batches; the schedule was built "
            f"for {pipeline.micro_batches}"
        )
    device = pipeline.device
    # The schedule re-splits the concatenation along dim 0 into exactly these micro-batches.
    inputs = (_on_device([b.inputs for b in micro_batches], device) if pipeline.is_first
              else None)
    targets = (_on_device([b.targets for b in micro_batches], device) if pipeline.is_last
               else None)
    losses: list[torch.Tensor] = []
    args = (inputs,) if inputs is not None else ()
    pipeline.schedule.step(*args, target=targets, losses=losses, return_outputs=False,
                           **_document_kwargs(pipeline, micro_batches))
    # Each entry is already loss / m, so the sum is the mean; the other ranks add zero.
    total = torch.zeros((), dtype=torch.float32, device=device)
    if pipeline.is_last:
        total += torch.stack([full_value(loss).detach().float() for loss in losses]).sum()
    dist.all_reduce(total, group=pipeline.group)
    return total


def _sequential_forward_loss(pipeline: Pipeline, micro_batch: MicroBatch) -> torch.Tensor:
    """Loss of one micro-batch (B, T) pushed through the stages one after the other with
    blocking send/recv; 0 on ranks without the last stage. Hidden states travel as fp32 in
    the shape both ranks know (`_activation_shape`: no shape is sent, which the receiver
    would have to read on the host); each stage takes its document ids from the micro-batch,
    which every rank holds. Every tensor sent or received lives on `pipeline.device`: an
    NCCL group has no CPU backend."""
    inputs, targets, documents = micro_batch.inputs, micro_batch.targets, micro_batch.document_ids
    modules = dict(zip(pipeline.stage_ids, pipeline.model_parts, strict=True))
    owner, me = pipeline.stage_owner, dist.get_rank(pipeline.group)
    num_stages = len(owner)
    device = pipeline.device
    hidden = None
    documents = None if documents is None else documents.to(device)
    loss = torch.zeros((), dtype=torch.float32, device=device)
    for stage in range(num_stages):
        if owner[stage] != me:
            continue
        if stage == 0:
            hidden = inputs.to(device)
        elif owner[stage - 1] != me:
            hidden = torch.empty(_activation_shape(modules[stage], inputs), device=device)
            dist.recv(hidden, group=pipeline.group, group_src=owner[stage - 1])
        hidden = modules[stage](hidden, document_ids=documents)
        if stage == num_stages - 1:
            loss = full_value(pipeline.loss_fn(hidden, targets.to(device))).float()
        elif owner[stage + 1] != me:
            dist.send(hidden.float().contiguous(), group=pipeline.group,
                      group_dst=owner[stage + 1])
    return loss


def _activation_shape(module: nn.Module, inputs: torch.Tensor) -> tuple[int, int, int]:
    """(B, T, d) of the hidden states a stage hands the next for a micro-batch of `inputs`
    (B, T): under tensor parallelism this rank's sequence shard, T / tp
    (parallel/tensor_parallel.py), tp read from the stage's own DTensor weights."""
    tp = 1
    for param in module.parameters():
        if isinstance(param, DTensor) and "tp" in (param.device_mesh.mesh_dim_names or ()):
            tp = param.device_mesh["tp"].size()
            break
    batch, positions = inputs.shape
    return batch, positions // tp, cast(Transformer, module).cfg.d_model


@torch.no_grad()
def pipeline_eval(pipeline: Pipeline, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
    """Mean loss over `micro_batches` (`MicroBatch`), each (B, T) int64, with forward passes
    only; a 0-dim fp32 tensor on every pp rank. Every rank passes the same list, whose
    length must be a multiple of `pipeline.micro_batches` (the schedule runs groups of that
    size). Leaves no gradients behind.

    Loop layouts run torch's `schedule.eval`. The V schedules' eval fails in torch 2.13 (their
    action list hands a backward between the two local stages even without backward:
    "can't steal_bwd_input if this stage doesn't have backward"), so they push each
    micro-batch through the stages in order instead: no overlap, same numbers.
    """
    m = pipeline.micro_batches
    eval_batches_per_rank(len(micro_batches), 1, m)  # whole rounds of the schedule
    total = torch.zeros((), dtype=torch.float32, device=pipeline.device)
    if pipeline.layout == "v":
        for micro_batch in micro_batches:
            total += _sequential_forward_loss(pipeline, micro_batch) / m
    else:
        for start in range(0, len(micro_batches), m):
            group = micro_batches[start:start + m]
            losses: list[torch.Tensor] = []
            device = pipeline.device
            args = (_on_device([b.inputs for b in group], device),) if pipeline.is_first else ()
            group_targets = (
                _on_device([b.targets for b in group], device) if pipeline.is_last else None
            )
            pipeline.schedule.eval(*args, target=group_targets, losses=losses,
                                   **_document_kwargs(pipeline, group))
            if pipeline.is_last:  # each entry is loss / m (the schedule's scaled loss)
                total += torch.stack([full_value(loss).float() for loss in losses]).sum()
    dist.all_reduce(total, group=pipeline.group)
    return total / (len(micro_batches) // m)
