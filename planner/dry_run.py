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
one line per rank and writes them all to RUN_DIR/dry_run.json.
"""

from __future__ import annotations

import json
import resource
from typing import Any

import torch
import torch.distributed as dist

from scaleforge.core.config import micro_batches_per_step
from scaleforge.core.trainer import Trainer
from scaleforge.planner.hardware import format_bytes
from scaleforge.planner.search import activation_setting, rank_activation_bytes
from scaleforge.planner.shards import state_of_parameters

REPORT_FILE = "dry_run.json"


def rank_report(trainer: Trainer) -> dict[str, Any]:
    """This rank's record: rank, label, bytes of parameters, gradients, optimizer state,
    activations (estimate) and peak resident memory (and peak CUDA memory on GPUs)."""
    topology, cfg = trainer.topology, trainer.cfg
    dims, p = topology.dims, cfg.parallel
    state = state_of_parameters(trainer.model.named_parameters(), dims)
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


def describe(record: dict[str, Any]) -> str:
    """One report line, e.g. 'dry run: rank 0 [pp0 dp0 tp0] parameters 1.20 GB, ...'."""
    line = (
        f"dry run: rank {record['rank']} {record['label']} parameters "
        f"{format_bytes(record['params'])}, gradients {format_bytes(record['grads'])}, "
        f"optimizer state {format_bytes(record['optimizer'])} (AdamW, allocated at step 1), "
        f"activations ~{format_bytes(record['activations'])} (estimate) | peak resident "
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
    for each in records:
        print(describe(each), flush=True)
    (trainer.run_dir / REPORT_FILE).write_text(json.dumps(records, indent=1) + "\n")
    print(f"dry run: built the layout, model, optimizer, loaders and resume state; stopped "
          f"before step 1 ({trainer.run_dir / REPORT_FILE})", flush=True)
    return records
