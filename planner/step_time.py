"""Predicted time of one optimizer step of a layout, from FLOPs, link bandwidths and the
pipeline bubble.

    step = (compute + tensor-parallel + pipeline p2p) / (1 - bubble) + exposed data-parallel

- compute, three terms on the slowest rank (the blocks split over the pp stages, the head
  on the last stage; everything split over tp x dp):
  - matmuls: the projection and head FLOPs of a step (core/flops.py
    `training_flops_per_token`, 3x forward for forward + backward) plus those
    checkpointing recomputes (`full`: the block up to its last matmul; `selective`: every
    other matmul), at `matmul_efficiency` x the GPU's peak; split over tp, except what
    every tp rank runs whole (`tp_whole_flops_per_token`: a MoE layer's router, and its
    experts unless `parallel.etp` splits them);
  - attention: the scores and values FLOPs (forward + backward, again under `full`) at
    `attention_efficiency` x peak (FlashAttention-2's measured rate on that GPU);
  - with `trainer.fp8` the blocks' projection matmuls (and their recompute) run at
    `matmul_efficiency` x the GPU's float8 peak instead (parallel/float8.py converts them;
    the head and attention stay at the bf16 rates). torchao's casts (an amax and a scaled
    copy of each matmul input) are memory-bound work not counted here, so the planned fp8
    speed-up is an upper bound;
  - memory-bound work: the HBM traffic of norms, casts, RoPE, activations, residual adds,
    the loss over the logits and AdamW (planner/memory_traffic.py) at `HBM_EFFICIENCY` x
    the GPU's memory bandwidth.
- links: the mesh order is pp > dp_replicate > dp_shard > cp > tp (tp innermost, so ranks
  next to each other share a node). A mesh axis whose group spans at most `gpus_per_node`
  consecutive ranks runs on NVLink; any other crosses nodes and runs at the inter-node
  bandwidth per GPU. Collectives are rings: an all-gather or reduce-scatter of S bytes over
  n ranks moves (n-1)/n x S through each GPU's link, an all-reduce twice that, at
  `LINK_EFFICIENCY` of the link's bandwidth (NCCL's bus bandwidth on these links).
- tensor parallel (Megatron's sequence parallelism as DTensor plans): per block and
  micro-batch two all-gathers and two reduce-scatters of the (b, s, d) activations in
  forward, as many in backward, again in a `full` recompute; plus the embedding's and the
  head's pair. On the critical path (nothing overlaps them).
- expert parallel (MoE, `parallel.ep`): each MoE layer sends its tokens' k assignments to
  their experts' ranks and back by all-to-all, in forward and again in backward (and in a
  `full` recompute); (ep-1)/ep of the (tokens x k, d) rows leave the rank each time. Under
  tp every tp rank sends the whole sequence's (parallel/expert_tensor_parallel.py). The ep
  group is ep consecutive ranks of dp_shard x cp, tp apart: NVLink while ep x tp ranks fit
  a node. On the critical path.
- pipeline: each micro-batch's (b, s, d/t) activations and gradients cross each stage
  boundary once per direction; counted on the critical path; the schedule's idle share is
  `parallel.pipeline_schedules.theoretical_bubble_fraction`.
- data parallel (FSDP2): weights all-gathered in the compute dtype (with
  `trainer.fp8=tensorwise` the blocks' projection weights in float8, 1 byte each: torchao's
  float8 all-gather) in forward and again in
  backward (when resharding after forward; once otherwise) for every micro-batch,
  gradients reduce-scattered in fp32 once per step (gradient sync only on the last
  micro-batch) and all-reduced across dp_replicate (HSDP). Overlapped with compute (FSDP
  prefetches the next block), except the first block's all-gather and the last block's
  reduce-scatter, and except what exceeds the compute it hides behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scaleforge.core.flops import attention_flops_per_token, training_flops_per_token
from scaleforge.models.config import TransformerConfig
from scaleforge.models.family import family_spec
from scaleforge.models.moe import expert_hidden
from scaleforge.models.param_count import attention_params, ffn_params, num_params
from scaleforge.parallel.pipeline_schedules import theoretical_bubble_fraction
from scaleforge.parallel.topology import MESH_DIMS, ParallelDims
from scaleforge.planner.activations import ActivationSetting, block_matmul_widths
from scaleforge.planner.hardware import GpuSpec
from scaleforge.planner.memory_traffic import (
    OPTIMIZER_BYTES_PER_ELEMENT,
    block_step_bytes,
    loss_bytes_per_token,
)
from scaleforge.planner.shards import GatheredElements

# Fraction of a link's bandwidth a ring collective reaches (NCCL's bus bandwidth).
LINK_EFFICIENCY = 0.8
# Fraction of the HBM bandwidth eager elementwise and normalisation kernels reach.
HBM_EFFICIENCY = 0.8


@dataclass(frozen=True)
class StepWork:
    """What one optimizer step asks of each GPU under a layout (see the module docstring)."""

    model: TransformerConfig
    seq_len: int
    global_batch_tokens: int
    micro_batch_size: int
    micro_batches: int  # per data-parallel rank and step
    dims: ParallelDims
    schedule: str | None  # None without pipeline parallelism
    stages_per_rank: int
    checkpointing: str
    every_n: int
    precision: str
    reshard_after_forward: bool
    gathered: GatheredElements  # FSDP's units on the rank that gathers most
    ep: int = 1  # expert-parallel size (MoE models)
    etp: int = 1  # expert tensor parallelism: 1 (experts whole on every tp rank) or tp
    fp8: str = "none"  # trainer.fp8: float8 block matmuls (and gathers, tensorwise)


@dataclass(frozen=True)
class StepTime:
    """Seconds of one step and its parts; bytes each GPU sends per step, per mesh axis."""

    compute_s: float  # matmul_s + attention_s + memory_s
    matmul_s: float
    attention_s: float
    memory_s: float
    tp_s: float
    pp_s: float
    dp_exposed_s: float
    bubble_fraction: float
    step_s: float
    comm_bytes: dict[str, float]


def axis_bandwidth(dims: ParallelDims, axis: str, gpu: GpuSpec, gpus_per_node: int) -> float:
    """Bytes/s a ring over mesh axis `axis` gets: NVLink when its groups stay inside a node."""
    inner = math.prod(getattr(dims, name) for name in MESH_DIMS[MESH_DIMS.index(axis) + 1:])
    span = inner * getattr(dims, axis)
    link = gpu.nvlink_bytes_per_s if span <= gpus_per_node else gpu.internode_bytes_per_s
    return link * LINK_EFFICIENCY


def recompute_flops_per_token(work: StepWork) -> float:
    """Forward matmul FLOPs per token that checkpointing adds (every n-th block): `full`
    recomputes the block's forward up to its last matmul (torch stops the recompute once
    it has what backward needs; the last projection's output is not needed), `selective`
    the matmuls it does not keep (every other one: wk, wo, w3 of a llama block)."""
    if work.checkpointing == "none":
        return 0.0
    m = work.model
    widths = block_matmul_widths(ActivationSetting(m, work.seq_len, 1))
    if work.checkpointing == "full":
        layer = (2 * m.d_model * sum(widths[:-1])
                 + attention_flops_per_token(m, work.seq_len) / m.n_layers)
    else:
        layer = 2 * m.d_model * sum(widths[1::2])
    wrapped = math.ceil(m.n_layers / work.dims.pp / work.every_n) * work.dims.pp
    return wrapped * layer


def _moe_layers(m: TransformerConfig) -> int:
    return sum(m.moe.is_moe_layer(layer) for layer in range(m.n_layers))


def tp_whole_flops_per_token(work: StepWork) -> float:
    """Training matmul FLOPs per token that every tp rank runs whole instead of its 1/tp
    share: each MoE layer's router, and its routed (top_k) and shared experts under etp 1
    (parallel/expert_tensor_parallel.py)."""
    m = work.model
    moe_layers = _moe_layers(m)
    if work.dims.tp == 1 or not moe_layers:
        return 0.0
    per_layer = m.d_model * m.moe.num_experts
    if work.etp == 1:
        per_layer += (m.moe.top_k + m.moe.shared_experts) * 3 * m.d_model * expert_hidden(m)
    return 6 * moe_layers * per_layer


def _per_rank(work: StepWork, blocks: float, head: float) -> float:
    """A per-token figure of the blocks and of the head, over the tokens and layers of the
    slowest rank (the last pipeline stage, which also runs the head); a context-parallel
    rank holds 1/cp of each sequence's tokens."""
    dims = work.dims
    return work.global_batch_tokens / (dims.dp_size * dims.cp) * (blocks / dims.pp + head)


def compute_times(work: StepWork, gpu: GpuSpec) -> tuple[float, float, float]:
    """(projection and head matmuls, attention, memory-bound work): seconds per step."""
    m, t = work.model, work.dims.tp
    head = 6 * m.d_model * m.vocab_rows
    attention = 3 * attention_flops_per_token(m, work.seq_len)
    recomputed = recompute_flops_per_token(work)
    recomputed_attention = (attention / 3 if work.checkpointing == "full" else 0.0) * (
        math.ceil(m.n_layers / work.dims.pp / work.every_n) * work.dims.pp / m.n_layers)
    matmuls = training_flops_per_token(m, work.seq_len) - head - attention
    whole = tp_whole_flops_per_token(work)
    block_rate = gpu.peak_flops * gpu.matmul_efficiency
    if work.fp8 != "none":
        assert gpu.fp8_peak_flops is not None, "checked by planner.hardware.check_fp8_gpu"
        block_rate = gpu.fp8_peak_flops * gpu.matmul_efficiency
    matmul_s = (_per_rank(work, (matmuls + recomputed - recomputed_attention - whole) / t
                          + whole, 0.0) / block_rate
                + _per_rank(work, 0.0, head / t) / (gpu.peak_flops * gpu.matmul_efficiency))
    attention_s = _per_rank(work, (attention + recomputed_attention) / t, 0.0) / (
        gpu.peak_flops * gpu.attention_efficiency)
    setting = ActivationSetting(m, work.seq_len, work.micro_batch_size, t, work.precision,
                                work.dims.dp_size > 1, work.checkpointing, work.every_n)
    shard_elements = work.gathered.total / (work.dims.dp_shard * work.dims.cp)
    traffic = (_per_rank(work, m.n_layers * block_step_bytes(setting),
                         loss_bytes_per_token(setting))
               + OPTIMIZER_BYTES_PER_ELEMENT * shard_elements)
    memory_s = traffic / (gpu.hbm_bytes_per_s * HBM_EFFICIENCY)
    return matmul_s, attention_s, memory_s


def step_time(work: StepWork, gpu: GpuSpec, gpus_per_node: int) -> StepTime:
    """The predicted step (see the module docstring) on `gpu`s, `gpus_per_node` per node."""
    dims, m = work.dims, work.model
    matmul_s, attention_s, memory_s = compute_times(work, gpu)
    compute = matmul_s + attention_s + memory_s
    e = 4 if work.precision == "fp32" else 2
    tokens = work.micro_batch_size * work.seq_len // dims.cp  # of a micro-batch, this rank
    activation = tokens * m.d_model * e  # (b, s / cp, d) bytes
    comm: dict[str, float] = {}
    tp_time = 0.0
    if dims.tp > 1:
        per_block = 12 if work.checkpointing == "full" else 8
        collectives = (m.n_layers // dims.pp * per_block + 4) * work.micro_batches
        comm["tp"] = collectives * (dims.tp - 1) / dims.tp * activation
        tp_time = comm["tp"] / axis_bandwidth(dims, "tp", gpu, gpus_per_node)
    cp_time = 0.0
    if dims.cp > 1:  # each block all-gathers K and V (forward), reduce-scatters their grads
        kv = tokens * dims.cp * family_spec(m.family).counts.kv_width(m) * e / dims.tp
        comm["cp"] = (2 * m.n_layers // dims.pp * work.micro_batches
                      * (dims.cp - 1) / dims.cp * kv)
        cp_time = comm["cp"] / axis_bandwidth(dims, "cp", gpu, gpus_per_node)
    ep_time = 0.0
    if work.ep > 1:
        moe_layers = _moe_layers(m) / dims.pp
        passes = 6 if work.checkpointing == "full" else 4  # dispatch and combine, each way
        rows = work.micro_batch_size * work.seq_len // dims.cp * m.moe.top_k
        comm["ep"] = (moe_layers * passes * work.micro_batches * (work.ep - 1) / work.ep
                      * rows * m.d_model * e)
        link = (gpu.nvlink_bytes_per_s if work.ep * dims.tp <= gpus_per_node
                else gpu.internode_bytes_per_s)
        ep_time = comm["ep"] / (link * LINK_EFFICIENCY)
    pp_time, bubble = 0.0, 0.0
    if dims.pp > 1 and work.schedule is not None:
        comm["pp"] = 2 * work.micro_batches * work.stages_per_rank * activation / dims.tp
        pp_time = comm["pp"] / axis_bandwidth(dims, "pp", gpu, gpus_per_node)
        bubble = theoretical_bubble_fraction(work.schedule, dims.pp, work.micro_batches,
                                             work.stages_per_rank)
    dp_time, dp_edge = _data_parallel(work, gpu, gpus_per_node, e, comm)
    busy = compute + tp_time + cp_time + ep_time + pp_time
    exposed = dp_edge + max(0.0, dp_time - busy)
    step = busy / (1 - bubble) + exposed
    return StepTime(compute, matmul_s, attention_s, memory_s, tp_time, pp_time, exposed, bubble,
                    step, comm)


def float8_gathered_fraction(m: TransformerConfig) -> float:
    """The share of a dense model's parameters that are block projection weights (what
    `trainer.fp8` converts: every block's attention and MLP matrices, no biases)."""
    blocks = sum(attention_params(m, biases=False) + ffn_params(m, layer, True, biases=False)
                 for layer in range(m.n_layers))
    return blocks / num_params(m)


def gathered_bytes(work: StepWork, e: int) -> float:
    """Bytes of one all-gather of the rank's FSDP shards' full weights: `e` bytes per
    element, except the block projection weights under trainer.fp8=tensorwise, which
    torchao gathers in float8 (1 byte)."""
    total = work.gathered.total
    if work.fp8 != "tensorwise":
        return total * e
    in_float8 = total * float8_gathered_fraction(work.model)
    return (total - in_float8) * e + in_float8


def _data_parallel(work: StepWork, gpu: GpuSpec, gpus_per_node: int, e: int,
                   comm: dict[str, float]) -> tuple[float, float]:
    """(seconds of FSDP/HSDP collectives per step, seconds of them nothing hides); fills
    `comm` with the bytes per mesh axis."""
    dims, g = work.dims, work.gathered
    time = edge = 0.0
    shards = dims.dp_shard * dims.cp  # FSDP shards over dp_shard x cp
    if shards > 1:
        share = (shards - 1) / shards
        gathers = 2 if work.reshard_after_forward else 1
        gather = share * gathered_bytes(work, e) * gathers * work.micro_batches
        scatter = share * g.total * 4
        comm["dp_shard"] = gather + scatter
        bandwidth = axis_bandwidth(dims, "dp_shard", gpu, gpus_per_node)
        time += comm["dp_shard"] / bandwidth
        edge += share * ((g.block + g.ends) * e + g.block * 4) / bandwidth
    if dims.dp_replicate > 1:
        share = (dims.dp_replicate - 1) / dims.dp_replicate
        shard_bytes = g.total * 4 / shards
        comm["dp_replicate"] = 2 * share * shard_bytes
        bandwidth = axis_bandwidth(dims, "dp_replicate", gpu, gpus_per_node)
        time += comm["dp_replicate"] / bandwidth
        edge += 2 * share * g.block * 4 / shards / bandwidth
    return time, edge
