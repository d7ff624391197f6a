"""sf-plan's output: the table it prints and the JSON record of each layout."""

from __future__ import annotations

from typing import Any

from scaleforge.core.config import Config
from scaleforge.planner.hardware import GB, GpuSpec
from scaleforge.planner.search import USABLE_FRACTION, PlannedLayout

HEADER = (f"{'tp':>3} {'pp':>3} {'schedule':<20} {'dp_rep':>6} {'dp_shard':>8} {'AC':<9} "
          f"{'mbs':>3} | {'params':>6} {'grads':>6} {'optim':>6} {'activ':>6} {'buffers':>7} "
          f"{'total':>6} GB | {'step s':>7} {'tok/s/GPU':>9} {'MFU':>5} | comm GB/step/GPU")


def layout_record(row: PlannedLayout) -> dict[str, Any]:
    """The JSON record of a layout: parallel sizes and schedule, checkpointing, micro-batch
    size, whether it fits, its largest rank's memory in bytes, step time, tokens/s per GPU,
    MFU."""
    layout, memory = row.layout, row.memory
    return {
        "parallel": {"tp": layout.tp, "pp": layout.pp, "dp_replicate": layout.dp_replicate,
                     "dp_shard": layout.dp_shard, "cp": row.config.parallel.cp,
                     "ep": row.config.parallel.ep,
                     "pp_schedule": layout.schedule,
                     "pp_stages_per_rank": layout.stages_per_rank},
        "activation_checkpointing": layout.checkpointing,
        "micro_batch_size": layout.micro_batch_size,
        "fits": row.fits,
        "memory_bytes": {"params": int(memory.params), "grads": int(memory.grads),
                         "optimizer": int(memory.optimizer),
                         "activations": int(memory.activations), "total": int(memory.total)},
        "step_time_s": row.time.step_s,
        "tokens_per_s_per_gpu": row.tokens_per_s_per_gpu,
        "mfu": row.mfu,
    }


def row_text(row: PlannedLayout) -> str:
    """One line of the table."""
    layout, memory = row.layout, row.memory
    schedule = "-" if layout.schedule is None else layout.schedule + (
        f" v{layout.stages_per_rank}" if layout.stages_per_rank > 1 else "")
    comm = ", ".join(f"{axis} {size / GB:.1f}" for axis, size in row.time.comm_bytes.items())
    sizes = " ".join(f"{value / GB:>6.1f}" for value in (memory.params, memory.grads,
                                                         memory.optimizer, memory.activations))
    return (f"{layout.tp:>3} {layout.pp:>3} {schedule:<20} {layout.dp_replicate:>6} "
            f"{layout.dp_shard:>8} {layout.checkpointing:<9} {layout.micro_batch_size:>3} | "
            f"{sizes} {memory.buffers / GB:>7.1f} {memory.total / GB:>6.1f}    | "
            f"{row.time.step_s:>7.2f} {row.tokens_per_s_per_gpu:>9.0f} {row.mfu:>5.1%} | "
            f"{comm or '-'}")


def print_table(rows: list[PlannedLayout], cfg: Config, gpus: int, gpu: GpuSpec,
                top: int) -> None:
    """The fastest `top` fitting layouts, then the closest layouts that do not fit with
    their reason and fix."""
    fitting = [row for row in rows if row.fits]
    print(f"sf-plan: {cfg.model.name} on {gpus} x {gpu.name} ({gpu.memory_bytes / GB:.0f} GB, "
          f"{USABLE_FRACTION:.0%} usable; {gpu.peak_flops / 1e12:.0f} TFLOP/s bf16 at "
          f"{gpu.matmul_efficiency:.0%} matmul efficiency) | seq_len {cfg.data.seq_len}, "
          f"{cfg.trainer.global_batch_tokens:,} tokens/step, precision "
          f"{cfg.trainer.precision} | {len(fitting)} of {len(rows)} layouts fit")
    print("memory of the largest rank; step time = (compute + tp + pp) / (1 - bubble) + "
          "exposed FSDP")
    if any(row.layout.stages_per_rank > 1 for row in rows):
        print("schedule vN: N pipeline stages on each rank (parallel.pp_stages_per_rank), "
              "interleaved or V-shaped")
    print(HEADER)
    for row in fitting[:top]:
        print(row_text(row))
    if len(fitting) > top:
        print(f"... {len(fitting) - top} more fitting layouts (out= writes them all)")
    unfit = [row for row in rows if not row.fits]
    if unfit:
        print(f"{len(unfit)} layouts do not fit; the closest:")
        for row in unfit[:5]:
            print(f"{row_text(row)}\n    {row.reason}: {row.fix}")
