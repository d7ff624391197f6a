"""`sf-plan`: which layouts of a model fit a cluster's GPUs, and how fast each would train.

    sf-plan model=llama_70b gpus=512 gpu=h100 data.seq_len=4096 trainer.global_batch_tokens=4194304
    sf-plan model=llama_70b gpus=512 gpu=h100 data.seq_len=4096 \
        trainer.global_batch_tokens=4194304 parallel.tp=8 parallel.pp=4 parallel.dp_shard=16 \
        out=p.json
    sf-plan model=llama_7b gpus=64 gpu=a100 data.seq_len=2048 trainer.global_batch_tokens=2097152

Run settings are sf-train's (`model=`, `model.*`, `data.*`, `trainer.*`, `parallel.*`,
composed by Hydra as sf-train composes them, so the plan is for the sequence length and
batch sf-train would use: give `data.seq_len` and `trainer.global_batch_tokens` for a
cluster run); an explicit `parallel.*` or `trainer.*` setting pins that axis. It prints the
torchrun command of the fastest fitting layout, and `out=` writes each layout's `command`.
The planner's own
settings are key=value (launch/key_value.py): `gpus` (total), `gpu` (h100, h200, a100, b200;
planner/hardware.py), `gpus_per_node` (8), the overrides `peak_tflops`, `gpu_memory_gb`,
`nvlink_gb_per_s`, `internode_gb_per_s` (one direction, per GPU) and `matmul_efficiency`,
`top` (fitting layouts printed, 15) and `out` (a JSON file of every layout).

Memory comes from the trainer's own sharded model built on the meta device over torch's
fake process group (planner/shards.py), the activation model of planner/activations.py and
FSDP's buffers (planner/buffers.py); time from planner/step_time.py. Bad input (an unknown
GPU, a GPU count no layout divides, a model one of whose blocks alone exceeds a GPU) prints
one `error:` line and exits with 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaleforge.errors import ConfigError, exit_on_config_error
from scaleforge.launch.key_value import is_help, parse_settings, print_help, required

CONFIG_GROUPS = ("model", "data", "trainer", "parallel", "optim", "checkpoint", "logging")


@dataclass
class PlanSettings:
    """The planner's own settings (see the module docstring)."""

    gpus: int = required("N (the number of GPUs)")  # GPUs of the whole run
    gpu: str = "h100"  # h100, h200, a100 or b200 (planner/hardware.py)
    gpus_per_node: int = 8  # GPUs per node: tensor parallelism stays inside one
    peak_tflops: float | None = None  # the GPU's dense bf16 TFLOP/s (null: the table's)
    gpu_memory_gb: float | None = None  # the GPU's memory in GB (null: the table's)
    # NVLink bandwidth per GPU, one direction, GB/s (null: the table's).
    nvlink_gb_per_s: float | None = None
    # Network bandwidth between nodes per GPU, one direction, GB/s (null: the table's).
    internode_gb_per_s: float | None = None
    # The fraction of peak large matmuls reach (null: the table's 0.7).
    matmul_efficiency: float | None = None
    top: int = 15  # fitting layouts printed (out= writes them all)
    out: str | None = None  # a JSON file of every layout with its command; null: none


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(sf-train overrides, the planner's key=value settings)."""
    overrides: list[str] = []
    settings: list[str] = []
    for argument in argv:
        key = argument.partition("=")[0]
        (overrides if key.split(".")[0] in CONFIG_GROUPS else settings).append(argument)
    return overrides, settings


def run_config(overrides: list[str]) -> Any:
    """The run's Config from sf-train `overrides`, as sf-train composes it (its sequence
    length and batch too); ConfigError for an override Hydra rejects."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from scaleforge.core.config import compose, to_config
    from scaleforge.core.precision import resolve_precision

    try:
        cfg = to_config(compose(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"sf-plan: {error}".splitlines()[0]) from None
    cfg.trainer.precision = resolve_precision(cfg.trainer.precision, "cuda")  # planned for GPUs
    return cfg


def plan(argv: list[str]) -> None:
    """Enumerate, print the table and write `out`; see the module docstring."""
    from scaleforge.planner.command import launch_command, layout_overrides
    from scaleforge.planner.hardware import check_fp8_gpu, gpu_spec
    from scaleforge.planner.search import USABLE_FRACTION, largest_block_bytes, plan_layouts
    from scaleforge.planner.shards import ShardProbe, fake_world
    from scaleforge.planner.table import layout_record, print_table

    overrides, arguments = split_arguments(argv)
    settings = parse_settings(PlanSettings, arguments, "sf-plan")
    gpu = gpu_spec(settings.gpu, settings.peak_tflops, settings.gpu_memory_gb,
                   settings.nvlink_gb_per_s, settings.internode_gb_per_s,
                   settings.matmul_efficiency)
    if settings.gpus < 1 or settings.gpus_per_node < 1:
        raise ConfigError(f"gpus={settings.gpus} and gpus_per_node={settings.gpus_per_node} "
                          "must be at least 1")
    cfg = run_config(overrides)
    check_fp8_gpu(cfg.trainer.fp8, gpu)
    pinned = {argument.partition("=")[0] for argument in overrides}
    probe = ShardProbe(cfg)
    with fake_world(settings.gpus):
        rows = plan_layouts(cfg, settings.gpus, gpu, settings.gpus_per_node, pinned, probe)
        if not any(row.fits for row in rows):
            block = largest_block_bytes(cfg, settings.gpus, settings.gpus_per_node, probe)
            usable = USABLE_FRACTION * gpu.memory_bytes
            if block > usable:
                raise ConfigError(
                    f"one transformer block of model {cfg.model.name} needs {block / 1e9:.1f} GB "
                    f"even sharded over all {settings.gpus} GPUs (its parameters, gradients, "
                    f"AdamW state, gathered weights and activations at micro-batch size 1) > "
                    f"{usable / 1e9:.1f} GB usable on a {gpu.name}: no layout fits; use GPUs "
                    "with more memory (gpu=, gpu_memory_gb=) or a smaller model"
                )
    print_table(rows, cfg, settings.gpus, gpu, settings.top)
    commands = [launch_command(overrides, layout_overrides(row.config, cfg), settings.gpus,
                               settings.gpus_per_node) for row in rows]
    fitting = [command for row, command in zip(rows, commands, strict=True) if row.fits]
    if fitting:
        print(f"to train the fastest fitting layout (first, as a dry run on the allocation: "
              f"add trainer.dry_run=true trainer.dry_run_gpu={settings.gpu}):\n  {fitting[0]}")
    if settings.out:
        path = Path(settings.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        records = [{**layout_record(row), "command": command}
                   for row, command in zip(rows, commands, strict=True)]
        path.write_text(json.dumps({"layouts": records}, indent=1) + "\n")
        print(f"plan -> {path} ({len(rows)} layouts, each with its command)")


def main() -> None:
    if is_help(sys.argv[1:]):
        print_help(PlanSettings, "sf-plan", __doc__ or "")
        return
    exit_on_config_error(plan, sys.argv[1:])


if __name__ == "__main__":
    main()
