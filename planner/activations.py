"""Activation memory of one rank: what autograd keeps between forward and backward.

Built on Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", arXiv 2205.05198): per layer and micro-batch a GPT layer keeps sbh(34 + 5as/h)
bytes in 16-bit (eq. 1; s sequence, b micro-batch, h width, a heads), sbh(10 + 24/t +
5as/(ht)) with tensor parallelism t (eq. 2), sbh/t (34 + 5as/h) with sequence parallelism
too (eq. 4), sbh 34/t with selective recomputation (eq. 6) and 2sbh, the layer's input, with
full recomputation (section 4.1, "full activation recomputation"); a pipeline's first stage
keeps p micro-batches of L/p layers (section 4.2.3). We count the same way, tensor by
tensor, for our blocks as they run here (checked by bench/plan_memory.py against autograd's
saved tensors):

- no dropout, so none of the paper's dropout masks;
- attention through SDPA's flash kernels (CUDA flash/efficient, and the CPU flash kernel
  PyTorch picks for these shapes), which keep the output and a logsumexp, never the s x s
  scores: the 5as/h term is gone;
- a DTensor linear keeps its all-gathered input (full sequence, width h), not the sequence
  shard Megatron keeps and re-gathers in backward; RowwiseParallel's input is a reshaped
  copy of the attention output;
- llama: RMSNorm computes in fp32 and keeps its fp32 input plus the normalised tensor (the
  q/k norms of `model.qk_norm` likewise, per head);
  RoPE keeps only its tables; SwiGLU keeps four (b, s, ffn/t) tensors; gpt: LayerNorm keeps
  its input, the GELU MLP two (b, s, ffn/t) tensors;
- dtypes: the residual stream is fp32 under autocast (bf16 without FSDP: fp32 weights),
  bf16 under FSDP's bf16 policy, fp32 in fp32; autocast casts a linear's input once per
  linear (three copies before q/k/v, two before w1/w3).
- the LM head keeps its gathered input and the logits; we model the chunked loss that keeps
  the logits in the compute dtype and only one chunk in fp32 at a time (the current fp32
  loss keeps an fp32 log-softmax instead: the same bytes in fp32 runs, twice them in bf16).

Activation checkpointing (trainer.activation_checkpointing, every n-th block): a `full`
block keeps its input; a `selective` one keeps its input and the outputs of every other
matmul, of attention and of the tp collectives (torchtitan's op-level policy, in
parallel/activation_checkpoint.py). Backward then recomputes
one block at a time, so one block's full activations come on top (`recompute_bytes`).

Pipelines keep several micro-batches in flight (`in_flight_micro_batches`), plus each
stage's received input and sent output per micro-batch.

Mixture-of-Experts layers (model.moe, models/moe.py) replace the MLP's tensors with the
router's (its fp32 softmax, the top-k weights and the int64 indices that sort, gather and
scatter the k assignments of each token) and, per assignment, its input and output rows and
the expert's four SwiGLU tensors of the expert width (split by tp only under
`parallel.etp`), plus the shared experts' SwiGLU per token, plus what the grouped GEMM's
padding keeps (`_moe_padding_bytes`). Under tp the MoE layer takes the
whole sequence on every tp rank (parallel/expert_tensor_parallel.py), so these count every
token, not a tp shard.

Context parallelism (cp): a rank holds seq_len / cp tokens of each sequence, so every
per-token term is divided by cp; attention also keeps the K and V gathered from the other
cp - 1 ranks for SDPA's backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaleforge.models.config import TransformerConfig
from scaleforge.models.family import FamilyCounts, family_spec
from scaleforge.models.moe import GROUP_ALIGNMENT, expert_hidden


@dataclass(frozen=True)
class ActivationSetting:
    """How one micro-batch runs through a rank's blocks.

    precision: trainer.precision; fsdp: data-parallel size > 1 (bf16 then comes from FSDP's
    policy, not autocast); checkpointing / every_n: trainer.activation_checkpointing and
    trainer.checkpoint_every_n_blocks; cp: parallel.cp; etp: parallel.etp.
    """

    model: TransformerConfig
    seq_len: int
    micro_batch_size: int
    tp: int = 1
    precision: str = "bf16"
    fsdp: bool = False
    checkpointing: str = "none"
    every_n: int = 1
    cp: int = 1
    etp: int = 1

    @property
    def compute_bytes(self) -> int:
        """Bytes of a matmul's inputs and outputs."""
        return 4 if self.precision == "fp32" else 2

    @property
    def residual_bytes(self) -> int:
        """Bytes of the residual stream: fp32 under autocast (fp32 weights, fp32 adds)."""
        return 2 if self.precision != "fp32" and self.fsdp else 4

    @property
    def autocast(self) -> bool:
        return self.precision != "fp32" and not self.fsdp

    @property
    def tokens(self) -> int:
        """Tokens of a micro-batch on this rank (its seq_len / cp of each sequence)."""
        return self.micro_batch_size * self.seq_len // self.cp


def _norm_bytes_per_token(x: ActivationSetting, consumers: int) -> float:
    """A norm and the gathered input of the `consumers` linears that read it (counted by
    the model's family: models/family.py)."""
    return _counts(x).norm_bytes(x.model, x, consumers)


def _counts(x: ActivationSetting) -> FamilyCounts:
    return family_spec(x.model.family).counts


def _moe_bytes_per_token(x: ActivationSetting) -> float:
    """A MoE layer's feed-forward per token (the module docstring), on one tp rank."""
    m, e = x.model, x.compute_bytes
    k, width = m.moe.top_k, expert_hidden(m) / x.etp
    routing = 4 * m.moe.num_experts + 4 * (2 * k + 1) + 8 * 4 * k  # softmax, weights, indices
    experts = k * (2 * e * m.d_model + 4 * e * width)  # rows in and out, SwiGLU's four
    shared = 4 * e * m.moe.shared_experts * width
    return _norm_bytes_per_token(x, 1) + routing + experts + shared


def _moe_padding_bytes(x: ActivationSetting) -> float:
    """What the grouped GEMM adds to a MoE layer per micro-batch (models/moe.py's
    `pad_groups`; nothing under model.moe.grouped_mm=loop): the padded copy of the n = top_k x
    tokens assignment rows, in a buffer of n + E x GROUP_ALIGNMENT rows, the four SwiGLU
    tensors' E x GROUP_ALIGNMENT extra rows, and the int64 position of each assignment in the
    buffer, kept twice (the scatter into it and the gather out). Counts all E experts and all
    n assignments under expert parallelism too (a balanced rank's receive, not a bound)."""
    m, e = x.model, x.compute_bytes
    if m.moe.grouped_mm == "loop":
        return 0.0
    width = expert_hidden(m) / x.etp
    n = m.moe.top_k * x.tokens
    extra = m.moe.num_experts * GROUP_ALIGNMENT
    return (n + extra) * m.d_model * e + extra * 4 * width * e + 2 * 8 * n


def block_bytes(x: ActivationSetting, layer: int = 0) -> float:
    """Bytes block `layer` keeps for one micro-batch without checkpointing, on one tp
    rank (its MLP a MoE one where model.moe says so); the attention's and the dense MLP's
    tensors as the model's family counts them (models/decoder_counts.py)."""
    counts, m = _counts(x), x.model
    attention = counts.attention_bytes(m, x)
    if m.moe.is_moe_layer(layer):
        return x.tokens * (attention + _moe_bytes_per_token(x)) + _moe_padding_bytes(x)
    return x.tokens * (attention + counts.mlp_bytes(m, x))


def block_matmul_widths(x: ActivationSetting) -> list[float]:
    """Output width per token of each projection matmul of a block on one tp rank, in the
    order forward runs them (llama: wq, wk, wv, wo, w1, w3, w2; gpt: no w3).
    Column-parallel outputs are sharded by tp; a row-parallel one is the full-width partial
    sum before its reduce-scatter."""
    return _counts(x).matmul_widths(x.model, x)


def checkpointed_block_bytes(x: ActivationSetting) -> float:
    """Bytes a checkpointed block keeps: its input, plus for `selective` the outputs of
    every other matmul (the 1st, 3rd, ...: wq, wv, w1, w2 of a llama block), of attention
    (SDPA's output and logsumexp) and, under tp, of the two all-gathers (the norms'
    outputs, full sequence, in the residual dtype) and the two reduce-scatters."""
    m, t, e, r = x.model, x.tp, x.compute_bytes, x.residual_bytes
    kept = r * m.d_model / t
    if x.checkpointing == "selective":
        kept += e * sum(block_matmul_widths(x)[::2])
        kept += _counts(x).attention_output_bytes(m, x)
        if t > 1:
            kept += 2 * r * m.d_model + 2 * e * m.d_model / t
    return x.tokens * kept


def head_bytes(x: ActivationSetting) -> float:
    """Bytes the final norm, the LM head and the (chunked) loss keep for one micro-batch."""
    m, t, e = x.model, x.tp, x.compute_bytes
    return x.tokens * (_norm_bytes_per_token(x, 1) + e * m.vocab_rows / t)


def stage_io_bytes(x: ActivationSetting) -> float:
    """A pipeline stage's received input and sent output, kept for its backward."""
    return x.tokens * 2 * x.residual_bytes * x.model.d_model / x.tp


def layers_bytes(x: ActivationSetting, layer_indices: range | list[int]) -> float:
    """Bytes the blocks `layer_indices` keep for one micro-batch (checkpointing applies to
    blocks whose index among the stage's blocks is a multiple of every_n, as
    parallel/activation_checkpoint.py wraps them)."""
    total = 0.0
    for position, layer in enumerate(layer_indices):
        wrapped = x.checkpointing != "none" and position % x.every_n == 0
        total += checkpointed_block_bytes(x) if wrapped else block_bytes(x, layer)
    return total


def peak_block_bytes(x: ActivationSetting) -> float:
    """`block_bytes` of the model's largest block (a MoE one, where it has both kinds)."""
    return max(block_bytes(x, layer) for layer in range(x.model.n_layers))


def recompute_bytes(x: ActivationSetting) -> float:
    """What backward adds on top under checkpointing: one block recomputed at a time (the
    largest)."""
    return peak_block_bytes(x) if x.checkpointing != "none" else 0.0


def in_flight_micro_batches(
    schedule: str | None, pp: int, pp_rank: int, micro_batches: int, stages_per_rank: int = 1
) -> float:
    """Micro-batches whose activations rank `pp_rank` holds at its peak, counted in units of
    a micro-batch through all of the rank's stages.

    No pipeline (schedule None or pp 1): 1 (gradient accumulation runs them one by one).
    GPipe: all m. 1F1B: min(m, pp - rank) (PipeDream-Flush; Korthikanti sec. 4.2.3).
    Interleaved1F1B / InterleavedZeroBubble: torch's warmup, (v-1) x m/rounds + f x
    (pp-1-rank) chunks with f = 2 / 1 (torch.distributed.pipelining.schedules
    _get_warmup_ops), plus the one in flight, capped at m x v, divided by v.
    ZBVZeroBubble: pp (Qi et al. 2023, ZB-V: 1F1B's peak). DualPipeV: pp + 1 (DeepSeek-V3
    report, arXiv 2412.19437, Table 2). Both capped at m.
    """
    m, p, v = micro_batches, pp, stages_per_rank
    if schedule is None or p == 1:
        return 1.0
    if schedule == "GPipe":
        return float(m)
    if schedule == "1F1B":
        return float(min(m, p - pp_rank))
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        factor = 2 if schedule == "Interleaved1F1B" else 1
        per_round = m // max(1, m // p)
        warmup = (v - 1) * per_round + factor * (p - 1 - pp_rank)
        return min(warmup + 1, m * v) / v
    if schedule == "ZBVZeroBubble":
        return float(min(m, p))
    if schedule == "DualPipeV":
        return float(min(m, p + 1))
    raise ValueError(f"unknown pipeline schedule {schedule!r}")
