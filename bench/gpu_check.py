"""The timing half of the GPU proof (bench/gpu_check.sh): training steps of llama_1b in bf16
at seq 2048 on one GPU, ours for every attention backend, compile on and off, activation
checkpointing none and selective, against torchtitan 0.3.0's Llama 3 1B at the same shape,
batch and steps (compile on and off); then a 7B-class shape if time is left.

    python -m scaleforge.bench.gpu_check --out OUT_DIR --budget-s 300   # on a CUDA machine
    python -m scaleforge.bench.gpu_check --dry                          # anywhere (CI)

Each measurement runs in its own process (a crash or out-of-memory in one is recorded and
the rest go on), in priority order, until the time budget is spent; what is left is recorded
as skipped. Per run: tokens/s, MFU by our exact FLOP count (causal attention) and by the
6N + attention convention torchtitan and Megatron report (every key counted), peak memory.
OUT_DIR gets gpu_check.json (everything) and gpu_check.md (the table, ratios ours /
torchtitan at equal compile setting).

--dry composes and validates every configuration the real run will use, as on a CUDA
machine (flash runs may only be refused for a missing flash-attn, as they will be there),
imports every entry point, and builds torchtitan's model on the meta device where
torchtitan (with triton, which CUDA machines have) imports.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from scaleforge.bench.torchtitan_baseline import (
    FLAVOURS,
    TORCHTITAN_VERSION,
    torchtitan_model_config,
)
from scaleforge.core import config as config_module
from scaleforge.core.config import Config, compose, to_config, validate
from scaleforge.core.flops import peak_flops, training_flops_per_token
from scaleforge.errors import ConfigError
from scaleforge.models.attention import flash_installed

SEQ_LEN = 2048
MICRO_BATCH = 4
WARMUP_STEPS = 3
TIMED_STEPS = 8
# Overrides shared by every run of ours: one micro-batch per optimizer step on a fixed
# batch already on the GPU, bf16 autocast over fp32 master weights, default kernels.
BASE = ["trainer.device=cuda", "trainer.precision=bf16", "trainer.deterministic=false",
        f"data.seq_len={SEQ_LEN}", "logging.wandb=disabled", "logging.progress_bar=false"]


@dataclass(frozen=True)
class SpeedRun:
    """One measurement: `system` "scaleforge" (Hydra `overrides`) or "torchtitan"."""

    name: str
    system: str
    model: str
    attention: str
    compile: bool
    activation_checkpointing: str
    micro_batch_size: int = MICRO_BATCH

    @property
    def overrides(self) -> list[str]:
        """Our command-line overrides for this run."""
        return [*BASE, f"model={self.model}", f"model.attention={self.attention}",
                f"trainer.compile={str(self.compile).lower()}",
                f"trainer.activation_checkpointing={self.activation_checkpointing}",
                f"trainer.micro_batch_size={self.micro_batch_size}",
                f"trainer.global_batch_tokens={self.micro_batch_size * SEQ_LEN}"]


def _ours(model: str, attention: str, compile_: bool, ac: str, batch: int = MICRO_BATCH
          ) -> SpeedRun:
    name = f"{model} {attention} compile={'on' if compile_ else 'off'} ac={ac}"
    return SpeedRun(name, "scaleforge", model, attention, compile_, ac, batch)


def _torchtitan(compile_: bool) -> SpeedRun:
    return SpeedRun(f"torchtitan llama3 1B flex compile={'on' if compile_ else 'off'} ac=none",
                    "torchtitan", "llama_1b", "flex", compile_, "none")


def speed_runs() -> list[SpeedRun]:
    """Every measurement, most important first (the budget cuts from the end)."""
    runs = [_ours("llama_1b", "sdpa", True, "none"), _torchtitan(True),
            _ours("llama_1b", "sdpa", False, "none"), _torchtitan(False),
            _ours("llama_1b", "flex", True, "none"), _ours("llama_1b", "flash", True, "none"),
            _ours("llama_1b", "sdpa", True, "selective"), _ours("llama_1b", "flex", False, "none"),
            _ours("llama_1b", "flash", False, "none")]
    runs += [_ours("llama_1b", attention, compile_, "selective")
             for attention, compile_ in (("sdpa", False), ("flex", True), ("flash", True))]
    # 7B-class (Llama 2 7B): fp32 masters + AdamW take 108 GB of the 141; selective
    # checkpointing and one sequence keep the activations small.
    runs.append(_ours("llama_7b", "sdpa", True, "selective", batch=1))
    return runs


def run_config(run: SpeedRun) -> Config:
    """The composed, typed config of one of our runs (not yet validated)."""
    return to_config(compose(run.overrides))


@contextlib.contextmanager
def _as_on_cuda() -> Iterator[None]:
    """Validation as on a CUDA machine: trainer.device=cuda resolves to cuda:0."""
    resolve = config_module.resolve_device
    config_module.resolve_device = lambda device: torch.device("cuda", 0)
    try:
        yield
    finally:
        config_module.resolve_device = resolve


def dry_check() -> list[str]:
    """Validate every run's config as on CUDA, import the entry points, build torchtitan's
    model on meta where it imports; returns what was checked (raises on a failure)."""
    import scaleforge.bench.train_step  # noqa: F401  (the shared timing helpers)
    from scaleforge.core.trainer import Trainer  # noqa: F401

    checked = []
    for run in speed_runs():
        if run.system == "torchtitan":
            continue
        cfg = run_config(run)
        with _as_on_cuda():
            try:
                validate(cfg)
            except ConfigError as error:
                if not (run.attention == "flash" and "pip install flash-attn" in str(error)):
                    raise
                checked.append(f"{run.name}: refused here as it will be without flash-attn")
                continue
        checked.append(f"{run.name}: config valid")
    checked.append(_dry_torchtitan())
    return checked


def _dry_torchtitan() -> str:
    """torchtitan's 1B on the meta device has exactly llama_1b's parameter count."""
    from scaleforge.models import num_params

    try:
        from torchtitan.models.llama3 import parallelize_llama  # noqa: F401
    except ImportError as error:
        return f"torchtitan not importable here ({error}); meta construction skipped"
    with torch.device("meta"):
        model = torchtitan_model_config(FLAVOURS["llama_1b"], SEQ_LEN).build()
    theirs = sum(p.numel() for p in model.parameters())
    ours = num_params(run_config(_ours("llama_1b", "sdpa", False, "none")).model)
    if theirs != ours:
        raise AssertionError(f"torchtitan 1B has {theirs:,} parameters, llama_1b {ours:,}")
    return f"torchtitan {TORCHTITAN_VERSION} llama3 1B built on meta: {theirs:,} parameters"


def measure(run: SpeedRun) -> dict[str, Any]:
    """Time `run` in this process on cuda:0: tokens/s, MFU both ways, peak memory."""
    from scaleforge.bench.train_step import seconds_per_step, warm_up_and_measure

    device = torch.device("cuda", 0)
    cfg = run_config(run)
    generator = torch.Generator().manual_seed(0)
    window = torch.randint(cfg.model.vocab_size, (run.micro_batch_size, SEQ_LEN + 1),
                           generator=generator)
    batch = (window[:, :-1].contiguous().to(device), window[:, 1:].contiguous().to(device))
    if run.system == "torchtitan":
        step, memory = warm_up_and_measure(lambda: _torchtitan_step(run, batch, device),
                                           device, WARMUP_STEPS)
    else:  # the Trainer validates cfg
        step, memory = warm_up_and_measure(lambda: _our_step(cfg, batch), device,
                                           WARMUP_STEPS)
    seconds = seconds_per_step(step, TIMED_STEPS, device)
    tokens_per_s = run.micro_batch_size * SEQ_LEN / seconds
    peak = peak_flops(device, "bf16")
    result: dict[str, Any] = {"ms_per_step": seconds * 1e3, "tokens_per_s": tokens_per_s,
                              "peak_memory_gib": memory}
    for key, causal in (("mfu", True), ("mfu_6n_attention", False)):
        flops = tokens_per_s * training_flops_per_token(cfg.model, SEQ_LEN, causal=causal)
        result[key] = flops / peak if peak else None
    return result


def _our_step(cfg: Config, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    from scaleforge.core.trainer import Trainer

    trainer = Trainer(cfg, Path(tempfile.mkdtemp(prefix="sf-gpu-check-")),
                      data=(itertools.repeat(batch), None))
    return lambda: trainer.train_step(trainer.train_batches)


def _torchtitan_step(run: SpeedRun, batch: tuple[torch.Tensor, torch.Tensor],
                     device: torch.device) -> Any:
    import torch.distributed as dist

    from scaleforge.bench.torchtitan_baseline import torchtitan_step

    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mktemp(prefix="sf-gpu-check-store-"), 1)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    return torchtitan_step(FLAVOURS[run.model], batch, run.compile, device)


def _run_child(run: SpeedRun, timeout_s: float) -> dict[str, Any]:
    """`measure(run)` in a fresh process; its result, or the error that ended it."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result_file:
        command = [sys.executable, "-m", "scaleforge.bench.gpu_check", "--one",
                   json.dumps(asdict(run)), "--result", result_file.name]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": f"stopped after {timeout_s:.0f} s (time budget)"}
        wall = time.perf_counter() - start
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            return {"status": f"failed: {last[:300]}", "wall_s": wall}
        return {"status": "ok", "wall_s": wall, **json.loads(Path(result_file.name).read_text())}


def run_all(out_dir: Path, budget_s: float) -> dict[str, Any]:
    """Every speed run within `budget_s` seconds; writes and returns the report."""
    deadline = time.monotonic() + budget_s
    results = []
    for run in speed_runs():
        left = deadline - time.monotonic()
        record: dict[str, Any] = {"run": asdict(run), "name": run.name}
        if left < 30:
            record["status"] = "skipped: time budget spent"
        elif run.attention == "flash" and not flash_installed():
            record["status"] = "skipped: flash-attn not installed"
        else:
            record |= _run_child(run, min(left, 180.0))
        print(f"{run.name}: {_summary(record)}", flush=True)
        results.append(record)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "seq_len": SEQ_LEN, "warmup_steps": WARMUP_STEPS, "timed_steps": TIMED_STEPS,
              "runs": results}
    write_report(report, out_dir)
    return report


def _summary(record: dict[str, Any]) -> str:
    if record.get("status") != "ok":
        return str(record.get("status"))
    mfu = record["mfu_6n_attention"]
    return (f"{record['tokens_per_s']:,.0f} tokens/s, MFU (6N+attn) "
            f"{'n/a' if mfu is None else f'{mfu:.1%}'}, {record['peak_memory_gib']:.1f} GiB")


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """gpu_check.json (all of `report`, merged into what gpu_check.sh wrote there before)
    and gpu_check.md (the table) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "gpu_check.json"
    merged = json.loads(json_path.read_text()) if json_path.exists() else {}
    json_path.write_text(json.dumps(merged | {"speed": report}, indent=2))
    (out_dir / "gpu_check.md").write_text(markdown_table(report, merged))


def markdown_table(report: dict[str, Any], steps: dict[str, Any]) -> str:
    """The speed runs as a markdown table, ratio to torchtitan at the same compile setting."""
    titan = {r["run"]["compile"]: r.get("tokens_per_s") for r in report["runs"]
             if r["run"]["system"] == "torchtitan" and r.get("status") == "ok"}
    lines = [f"GPU: {report['device']} | torch {report['torch']} | seq {report['seq_len']}, "
             f"bf16, {report['warmup_steps']} warm-up + {report['timed_steps']} timed steps",
             ""]
    lines += [f"- {name}: {value}" for name, value in steps.get("steps", {}).items()]
    lines += ["", "| run | batch | tokens/s | MFU exact | MFU 6N+attn | peak GiB | vs torchtitan |",
              "|---|---|---|---|---|---|---|"]
    for record in report["runs"]:
        run = record["run"]
        if record.get("status") != "ok":
            lines.append(f"| {record['name']} | {run['micro_batch_size']} x {report['seq_len']} "
                         f"| {record.get('status')} | | | | |")
            continue
        base = titan.get(run["compile"]) if run["model"] == "llama_1b" else None
        ratio = f"{record['tokens_per_s'] / base:.3f}" if base else ""
        mfu = [("n/a" if record[k] is None else f"{record[k]:.1%}")
               for k in ("mfu", "mfu_6n_attention")]
        lines.append(f"| {record['name']} | {run['micro_batch_size']} x {report['seq_len']} | "
                     f"{record['tokens_per_s']:,.0f} | {mfu[0]} | {mfu[1]} | "
                     f"{record['peak_memory_gib']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="validate and import only")
    parser.add_argument("--out", type=Path, help="OUT_DIR for gpu_check.json and .md")
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds for all runs")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one SpeedRun as JSON
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry:
        for line in dry_check():
            print(f"dry: {line}")
        print(f"dry: {len(speed_runs())} speed runs checked")
        return
    if args.one:
        result = measure(SpeedRun(**json.loads(args.one)))
        args.result.write_text(json.dumps(result))
        return
    if args.out is None:
        parser.error("give --out OUT_DIR (or --dry)")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    run_all(args.out, args.budget_s)


if __name__ == "__main__":
    main()
