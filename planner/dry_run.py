"""The dry run (`trainer.dry_run=true`): build everything a run builds, report each rank's
memory, stop before step 1.

`sf-train` constructs the Trainer as for training (layout and process groups, model shards,
optimizer, data loaders, checkpoint resume) and then calls `report_dry_run` instead of
`fit`: no training step, no evaluation, no checkpoint. Each rank counts its own parameters
(DTensors by their local shard), the gradients they will get (the same shapes and dtype,
but for the whole-table embedding gradient under tp without FSDP:
`planner.shards.replicated_gradient_elements`),
the AdamW state the first step will allocate (exp_avg and exp_avg_sq like the parameter,
and a 4-byte step per parameter: `planner.shards.state_of_parameters`, the count sf-plan
uses), and the activation estimate of `planner.search.rank_activation_bytes` (sf-plan's
model), with its peak resident memory so far (and peak CUDA memory on GPUs). Rank 0 prints
the layout, model shape and batch it built (the layout as sf-plan's `Layout.describe`
writes it, so a planned command can be checked against its plan), one line per rank with
its total, and, with `trainer.dry_run_gpu`, the largest total against that GPU's usable
memory as sf-plan counts it (90%); it writes the records to RUN_DIR/dry_run.json.
"""

from __future__ import annotations

import json
import resource
from typing import Any

import torch
import torch.distributed as dist

from scaleforge.core.config import micro_batches_per_step
from scaleforge.core.trainer import Trainer
from scaleforge.planner.hardware import format_bytes, gpu_spec
from scaleforge.planner.search import (
    USABLE_FRACTION,
    Layout,
    activation_setting,
    rank_activation_bytes,
)
from scaleforge.planner.shards import state_of_parameters

REPORT_FILE = "dry_run.json"


def rank_report(trainer: Trainer) -> dict[str, Any]:
    """This rank's record: rank, label, bytes of parameters, gradients, optimizer state,
    activations (estimate) and peak resident memory (and peak CUDA memory on GPUs)."""
    topology, cfg = trainer.topology, trainer.cfg
    dims, p = topology.dims, cfg.parallel
    state = state_of_parameters(trainer.model_parts.named_parameters(), dims)
    schedule = p.pp_schedule if dims.pp > 1 else None
    stages = p.pp_stages_per_rank if dims.pp > 1 else 1
    activations = rank_activation_bytes(
        activation_setting(cfg, dims), dims, topology.pp_rank, schedule, stages,
        micro_batches_per_step(cfg, dims.dp_size), p.pp_layers_per_stage,
    )
    record: dict[str, Any] = {
        "rank": topology.rank, "label": topology.label(), "params": state.params,
        "grads": state.grads, "optimizer": state.optimizer, "activations": int(activations),
        # ru_maxrss is in kilobytes on Linux
        "peak_resident_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if trainer.device.type == "cuda":
        record["peak_device_bytes"] = torch.cuda.max_memory_allocated(trainer.device)
    return record


def describe_built(trainer: Trainer) -> str:
    """The layout, model shape and batch the dry run built, e.g. 'dry run: layout tp 1 pp 1
    dp_rep 1 dp_shard 2 | - | AC none | mbs 2 | model llama_micro: 2 layers, ...'."""
    cfg, dims = trainer.cfg, trainer.topology.dims
    p, t, m = cfg.parallel, cfg.trainer, cfg.model
    layout = Layout(dims.tp, dims.pp, dims.dp_replicate, dims.dp_shard,
                    p.pp_schedule if dims.pp > 1 else None,
                    p.pp_stages_per_rank if dims.pp > 1 else 1,
                    t.activation_checkpointing, t.micro_batch_size)
    extra = "".join(f" {name} {value}" for name, value in
                    (("cp", dims.cp), ("ep", p.ep), ("etp", p.etp)) if value > 1)
    micro_batches = micro_batches_per_step(cfg, dims.dp_size)
    return (f"dry run: layout {layout.describe()}{extra} | model {m.name}: {m.n_layers} "
            f"layers, d_model {m.d_model}, {m.n_heads} heads, vocab {m.vocab_size} | seq_len "
            f"{cfg.data.seq_len}, {t.global_batch_tokens:,} tokens/step = {micro_batches} "
            f"micro-batch{'es' if micro_batches != 1 else ''} x {t.micro_batch_size} x "
            f"{cfg.data.seq_len} per data-parallel rank x {dims.dp_size}")


def total_bytes(record: dict[str, Any]) -> int:
    """A rank's parameters, gradients, optimizer state and activations (sf-plan's total,
    less FSDP's gathered-weight buffers)."""
    return sum(record[key] for key in ("params", "grads", "optimizer", "activations"))


def against_gpu(records: list[dict[str, Any]], gpu_name: str) -> str:
    """The largest rank's total against `gpu_name`'s usable memory, as sf-plan counts it."""
    gpu = gpu_spec(gpu_name)
    usable = USABLE_FRACTION * gpu.memory_bytes
    largest = max(records, key=total_bytes)
    verdict = "fits" if total_bytes(largest) <= usable else "does NOT fit"
    return (f"dry run: the largest rank ({largest['rank']}) totals "
            f"{format_bytes(total_bytes(largest))}: {verdict} in the "
            f"{format_bytes(int(usable))} usable of a {gpu.name} ({USABLE_FRACTION:.0%} of "
            f"{format_bytes(int(gpu.memory_bytes))}; FSDP's gathered weights come on top)")


def describe(record: dict[str, Any]) -> str:
    """One report line, e.g. 'dry run: rank 0 [pp0 dp0 tp0] parameters 1.20 GB, ...'."""
    line = (
        f"dry run: rank {record['rank']} {record['label']} parameters "
        f"{format_bytes(record['params'])}, gradients {format_bytes(record['grads'])}, "
        f"optimizer state {format_bytes(record['optimizer'])} (AdamW, allocated at step 1), "
        f"activations ~{format_bytes(record['activations'])} (estimate), total "
        f"{format_bytes(total_bytes(record))} | peak resident "
        f"{format_bytes(record['peak_resident_bytes'])}"
    )
    if "peak_device_bytes" in record:
        line += f", peak CUDA {format_bytes(record['peak_device_bytes'])}"
    return line


def report_dry_run(trainer: Trainer) -> list[dict[str, Any]]:
    """Gather every rank's record on rank 0, print one line per rank there and write them
    to RUN_DIR/dry_run.json; return the records (rank 0) or this rank's alone (others).
    Collective: every rank calls it."""
    record = rank_report(trainer)
    records = [record]
    if trainer.topology.is_distributed:
        records = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(records, record)
    if not trainer.topology.is_rank0:
        return [record]
    print(describe_built(trainer), flush=True)
    for each in records:
        print(describe(each), flush=True)
    if trainer.cfg.trainer.dry_run_gpu:
        print(against_gpu(records, trainer.cfg.trainer.dry_run_gpu), flush=True)
    (trainer.run_dir / REPORT_FILE).write_text(json.dumps(records, indent=1) + "\n")
    print(f"dry run: built the layout, model, optimizer, loaders and resume state; stopped "
          f"before step 1 ({trainer.run_dir / REPORT_FILE})", flush=True)
    return records
