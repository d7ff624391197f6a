"""The layout's rules, checked before any process group exists: the sizes' product against
the world size, tensor parallelism against the model's heads, widths and vocabulary, and
context parallelism against the sequence length and the attention kernel (`check_layout`).
Runs identically on every rank, so a bad layout stops every rank with the same ConfigError
and none waits in a collective; `parallel.run_setup.init_topology` then builds the mesh.
"""

from __future__ import annotations

import math

from scaleforge.errors import ConfigError
from scaleforge.models.attention import AttentionRun, check_attention
from scaleforge.models.config import TransformerConfig
from scaleforge.parallel.config import ParallelConfig
from scaleforge.parallel.topology import ParallelDims


def _resolve_dp_shard(parallel: ParallelConfig, world_size: int) -> int:
    if parallel.dp_shard != -1:
        return parallel.dp_shard
    sizes = {name: getattr(parallel, name) for name in ("tp", "pp", "dp_replicate", "cp")}
    others = parallel.tp * parallel.pp * parallel.dp_replicate * parallel.cp
    if world_size % others:
        named = [f"parallel.{name}={size}" for name, size in sizes.items() if size > 1]
        product = " x ".join(named) + (f" = {others}" if len(named) > 1 else "")
        raise ConfigError(
            f"the world size {world_size} (WORLD_SIZE) is not a multiple of {product}, so "
            f"parallel.dp_shard=-1 (the rest of the world) has no size; start {others} "
            f"processes (torchrun --nproc-per-node {others}) or a multiple, or lower those "
            f"sizes until their product divides {world_size}"
        )
    return world_size // others


def _divides(setting: str, size: int, target_name: str, target: int, fix: str) -> None:
    if target % size:
        raise ConfigError(
            f"{setting}={size} does not divide {target_name}={target}; {fix}"
        )


def layout_dims(parallel: ParallelConfig, world_size: int) -> ParallelDims:
    """The layout's sizes for `world_size` processes (dp_shard=-1 resolved); ConfigError
    for a size < 1 or a product that is not the world size. The other fields' checks are
    `ParallelConfig.check`."""
    parallel.check_sizes()
    p = parallel
    dims = ParallelDims(p.tp, p.pp, p.dp_replicate, _resolve_dp_shard(p, world_size), p.cp)
    if dims.world_size != world_size:
        raise ConfigError(
            f"parallel.tp x pp x dp_replicate x dp_shard x cp = {dims.tp} x {dims.pp} x "
            f"{dims.dp_replicate} x {dims.dp_shard} x {dims.cp} = {dims.world_size} does not "
            f"match the world size {world_size} (WORLD_SIZE); {_product_fix(dims, world_size)}"
        )
    return dims


def _product_fix(dims: ParallelDims, world_size: int) -> str:
    """The change that makes the product the world size: dp_shard=-1 where the other sizes
    divide it, else the processes to start or the sizes to lower."""
    others = dims.tp * dims.pp * dims.dp_replicate * dims.cp
    if world_size % others == 0:
        return (f"set parallel.dp_shard={world_size // others} (or -1: the rest of the "
                "world)")
    return (f"tp x pp x dp_replicate x cp = {others} does not divide {world_size}: start a "
            f"multiple of {others} processes (torchrun --nproc-per-node), or lower those "
            "sizes")


def check_layout(
    parallel: ParallelConfig, model: TransformerConfig, seq_len: int, world_size: int
) -> ParallelDims:
    """Validate the layout against the world size, the model and the sequence length (the
    data.seq_len setting); return its sizes (`layout_dims`, then `check_layout_model`)."""
    parallel.check()
    dims = layout_dims(parallel, world_size)
    check_layout_model(dims, model, seq_len)
    return dims


def check_layout_model(dims: ParallelDims, model: TransformerConfig, seq_len: int) -> None:
    """Raise ConfigError (one line: the setting, its value, the fix) for tp not dividing the
    heads, kv heads, MLP width, vocabulary or sequence length, and for cp > 1 a sequence
    length that does not split into 2 x cp (x tp) equal chunks or an attention kernel
    without a context-parallel form (asked of the kernel). The pipeline's own rules
    (stages, layers, micro-batches) are `parallel.pipeline_schedules.validate_pipeline`,
    called by `core.config.validate`.
    """
    if dims.tp > 1:
        tp_fix = _tp_fix(dims, model, seq_len)
        _divides("parallel.tp", dims.tp, "model.n_heads", model.n_heads, tp_fix)
        _divides(
            "parallel.tp", dims.tp, "model.n_kv_heads", model.kv_heads,
            f"kv heads are split across tensor-parallel ranks, not replicated; {tp_fix}",
        )
        _divides("parallel.tp", dims.tp, "the MLP width (model.ffn_hidden)", model.mlp_hidden,
                 tp_fix)
        _divides(
            "parallel.tp", dims.tp, "model.vocab_size", model.vocab_rows,
            "the embedding and LM head are split by vocabulary rows; set model.vocab_size="
            f"{-(-model.vocab_rows // dims.tp) * dims.tp} (extra rows are never a target)",
        )
        _divides("parallel.tp", dims.tp, "data.seq_len", seq_len,
                 "sequence parallelism splits the sequence; set data.seq_len="
                 f"{_multiple_below(seq_len, dims.tp)}")
    if dims.cp > 1:
        _check_context_parallel(dims, model, seq_len)


def _tp_fix(dims: ParallelDims, model: TransformerConfig, seq_len: int) -> str:
    """The largest smaller tp that divides everything tp splits (heads, kv heads, MLP width,
    vocabulary rows, sequence) and the processes the other sizes leave, so that
    parallel.dp_shard=-1 takes the processes it frees."""
    rest = dims.world_size // (dims.pp * dims.dp_replicate * dims.cp)
    shared = math.gcd(model.n_heads, model.kv_heads, model.mlp_hidden, model.vocab_rows,
                      seq_len, rest)
    tp = max(d for d in range(1, dims.tp) if shared % d == 0)
    return (f"set parallel.tp={tp}, the largest tp below {dims.tp} that divides the heads, "
            "kv heads, MLP width, vocabulary and data.seq_len")


def _multiple_below(value: int, multiple: int) -> int:
    """The largest multiple of `multiple` up to `value` (`multiple` when none is)."""
    return max(value // multiple * multiple, multiple)


def _check_context_parallel(dims: ParallelDims, model: TransformerConfig, seq_len: int) -> None:
    chunks = 2 * dims.cp * dims.tp
    _divides(f"2 x parallel.cp{' x parallel.tp' if dims.tp > 1 else ''}", chunks,
             "data.seq_len", seq_len,
             f"each sequence is cut into 2 x cp chunks (head and tail per rank), each split "
             f"again by tensor-parallel sequence parallelism; set data.seq_len="
             f"{_multiple_below(seq_len, chunks)}")
    check_attention(model.attention, AttentionRun(cp=dims.cp))  # a kernel with a cp form
