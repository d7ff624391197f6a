"""The timing half of the GPU proof (bench/gpu_check.sh): training steps of ours against
torchtitan 0.2.2's Llama 3 at the same model, tokens, precision (bf16 autocast over fp32
master weights) and attention kernel, compiled on both sides, on one GPU.

    python -m scaleforge.bench.gpu_check --out OUT_DIR --budget-s 240   # on a CUDA machine
    python -m scaleforge.bench.gpu_check --out OUT_DIR --rehearse       # its CPU twin
    python -m scaleforge.bench.gpu_check --dry                          # anywhere (CI)

The shape follows the card's memory (`plan_for`): llama_1b at seq 2048 with 4 sequences a
step on an 80 GB H100 (weights, gradients and AdamW state 20 GB, activations without
checkpointing about 20 GB), 8 on a 141 GB H200, where a Llama 2 7B row (fp32 masters and
AdamW take 108 GB, selective checkpointing, one sequence) comes last. Runs, most important
first (the budget cuts from the end): ours and torchtitan with SDPA, compiled (the headline
ratio, equal kernels); each side's best (ours flash and flex, torchtitan flex); both
uncompiled; ours with selective checkpointing; the 7B row.

Each measurement runs in its own process (a crash or out-of-memory in one is recorded and
the rest go on): warm-up steps (compilation), then `repeats` (3) timings of `steps` steps;
tokens/s is their median, with their min, max and spread ((max - min) / median). MFU by our
exact FLOP count (causal attention) and by the 6N + attention convention torchtitan reports.
gpu_check.json is rewritten after every run, so a run cut short still returns what it
measured; gpu_check.md is its table (bench/gpu_report.py).

--rehearse is the same on the CPU, the GPU-only parts replaced by CPU twins: llama_micro at
seq 64, ours and torchtitan with SDPA (flex attention has no CPU backward), compiled, the
same bf16 autocast, ours with fp8 uncompiled (compiled fp8 is refused on a CPU;
torchtitan's fp8 row is skipped with its reason: its converter refuses a CPU), gloo in
place of NCCL for torchtitan's process group. Its numbers are CPU numbers and say nothing
about a GPU; it proves the commands run.

--dry composes and validates every configuration the GPU runs will use (both cards' plans)
as on a CUDA machine, and checks torchtitan's model at llama_1b's shape has its parameter
count where torchtitan imports.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from scaleforge.bench.gpu_report import write_report
from scaleforge.bench.torchtitan_baseline import TORCHTITAN_VERSION
from scaleforge.core import config as config_module
from scaleforge.core.config import Config, compose, to_config, validate
from scaleforge.core.flops import peak_flops, training_flops_per_token
from scaleforge.data_pipeline.batch import Batch
from scaleforge.errors import ConfigError
from scaleforge.models.attention import flash_installed

REPEATS = 3
# GiB of GPU memory from which a card gets the bigger plan (the H200's 141 GB; the H100's
# 80 GB and below get the smaller one).
LARGE_CARD_GIB = 120.0


@dataclass(frozen=True)
class Plan:
    """Where and at what shape the runs time: device type, model preset, tokens per step,
    warm-up steps, timed steps per repeat, repeats; `big_model` a last row ("" for none)."""

    device: str
    model: str
    seq_len: int
    micro_batch_size: int
    warmup: int
    steps: int
    repeats: int = REPEATS
    big_model: str = ""
    rehearsal: bool = False


def plan_for(memory_gib: float | None, rehearse: bool = False) -> Plan:
    """The plan for a card with `memory_gib` of memory (None: the CPU rehearsal)."""
    if rehearse or memory_gib is None:
        return Plan("cpu", "llama_micro", 64, 4, warmup=2, steps=2, rehearsal=True)
    if memory_gib >= LARGE_CARD_GIB:
        return Plan("cuda", "llama_1b", 2048, 8, warmup=3, steps=5, big_model="llama_7b")
    return Plan("cuda", "llama_1b", 2048, 4, warmup=3, steps=5)


@dataclass(frozen=True)
class SpeedRun:
    """One measurement: `system` "scaleforge" (Hydra `overrides`) or "torchtitan"."""

    name: str
    system: str
    model: str
    attention: str
    compile: bool
    activation_checkpointing: str
    micro_batch_size: int
    seq_len: int
    device: str
    warmup: int
    steps: int
    repeats: int
    fp8: str = "none"

    @property
    def overrides(self) -> list[str]:
        """Our command-line overrides for this run."""
        return [f"trainer.device={self.device}", "trainer.precision=bf16",
                "trainer.deterministic=false", f"data.seq_len={self.seq_len}",
                "logging.wandb=disabled", "logging.progress_bar=false",
                f"model={self.model}", f"model.attention={self.attention}",
                f"trainer.compile={str(self.compile).lower()}",
                f"trainer.activation_checkpointing={self.activation_checkpointing}",
                f"trainer.micro_batch_size={self.micro_batch_size}",
                f"trainer.global_batch_tokens={self.micro_batch_size * self.seq_len}",
                f"trainer.fp8={self.fp8}"]


def _run(plan: Plan, system: str, attention: str, compile_: bool, ac: str = "none",
         model: str = "", batch: int = 0, fp8: str = "none") -> SpeedRun:
    model = model or plan.model
    who = "ours" if system == "scaleforge" else f"torchtitan {TORCHTITAN_VERSION}"
    name = (f"{who} {model} {attention} compile={'on' if compile_ else 'off'} ac={ac}"
            + (f" fp8={fp8}" if fp8 != "none" else ""))
    return SpeedRun(name, system, model, attention, compile_, ac,
                    batch or plan.micro_batch_size, plan.seq_len, plan.device, plan.warmup,
                    plan.steps, plan.repeats, fp8)


def speed_runs(plan: Plan) -> list[SpeedRun]:
    """Every measurement of `plan`, most important first (the budget cuts from the end)."""
    ours, titan = "scaleforge", "torchtitan"
    runs = [_run(plan, ours, "sdpa", True), _run(plan, titan, "sdpa", True),
            # fp8: ours with trainer.fp8=tensorwise against torchtitan's float8 converter
            # (the same torchao recipe; head and embeddings in bf16 on both sides);
            # compiled on a GPU, eager in the rehearsal (compiled fp8 on a CPU is refused)
            _run(plan, ours, "sdpa", not plan.rehearsal, fp8="tensorwise"),
            _run(plan, titan, "sdpa", not plan.rehearsal, fp8="tensorwise")]
    if plan.rehearsal:
        return runs
    runs += [_run(plan, ours, "flash", True), _run(plan, titan, "flex", True),
             _run(plan, ours, "flex", True), _run(plan, ours, "sdpa", False),
             _run(plan, titan, "sdpa", False), _run(plan, ours, "sdpa", True, "selective")]
    if plan.big_model:
        runs.append(_run(plan, ours, "sdpa", True, "selective", plan.big_model, batch=1))
    return runs


def run_config(run: SpeedRun) -> Config:
    """The composed, typed config of one of our runs (not yet validated); token ids over
    the model's whole vocabulary."""
    cfg = to_config(compose(run.overrides))
    cfg.data.vocab_size = cfg.model.vocab_size
    return cfg


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
    """Validate every GPU run's config (both cards' plans) as on CUDA and the rehearsal's,
    import the entry points, check torchtitan's parameter count where it imports; returns
    what was checked (raises on a failure)."""
    import scaleforge.bench.collectives_check  # noqa: F401
    import scaleforge.bench.train_step  # noqa: F401  (the shared timing helpers)
    from scaleforge.core.trainer import Trainer  # noqa: F401

    checked = []
    for memory in (80.0, 141.0, None):
        for run in speed_runs(plan_for(memory)):
            if run.system == "torchtitan":
                continue
            cfg = run_config(run)
            with _as_on_cuda() if run.device == "cuda" else contextlib.nullcontext():
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
    """torchtitan's Llama 3 at llama_1b's shape has exactly llama_1b's parameter count."""
    from scaleforge.bench.torchtitan_baseline import parameter_count
    from scaleforge.models import num_params

    cfg = run_config(_run(plan_for(80.0), "scaleforge", "sdpa", False)).model
    try:
        theirs = parameter_count(cfg, 2048)
    except ImportError as error:
        return f"torchtitan not importable here ({error}); its parameter count not checked"
    if theirs != num_params(cfg):
        raise AssertionError(f"torchtitan's llama_1b has {theirs:,} parameters, ours "
                             f"{num_params(cfg):,}")
    return f"torchtitan {TORCHTITAN_VERSION} at llama_1b's shape: {theirs:,} parameters"


def measure(run: SpeedRun) -> dict[str, Any]:
    """Time `run` in this process: tokens/s (median of the repeats, min, max, spread), MFU
    both ways, peak memory."""
    from scaleforge.bench.train_step import seconds_per_step, warm_up_and_measure

    device = torch.device("cuda", 0) if run.device == "cuda" else torch.device("cpu")
    cfg = run_config(run)
    generator = torch.Generator().manual_seed(0)
    window = torch.randint(cfg.model.vocab_rows, (run.micro_batch_size, run.seq_len + 1),
                           generator=generator)
    batch = Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous()).to(device)
    start = time.perf_counter()
    if run.system == "torchtitan":
        tensors = (batch.inputs, batch.targets)
        step, memory = warm_up_and_measure(lambda: _torchtitan_step(run, cfg, tensors, device),
                                           device, run.warmup)
    else:  # the Trainer validates cfg
        step, memory = warm_up_and_measure(lambda: _our_step(cfg, batch), device, run.warmup)
    warm_s = time.perf_counter() - start
    tokens = run.micro_batch_size * run.seq_len
    rates = [tokens / seconds_per_step(step, run.steps, device) for _ in range(run.repeats)]
    median = statistics.median(rates)
    peak = peak_flops(device, "bf16")
    result: dict[str, Any] = {
        "tokens_per_s": median, "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
        "spread": (max(rates) - min(rates)) / median, "ms_per_step": tokens / median * 1e3,
        "peak_memory_gib": memory, "warmup_s": warm_s}
    for key, causal in (("mfu", True), ("mfu_6n_attention", False)):
        flops = median * training_flops_per_token(cfg.model, run.seq_len, causal=causal)
        result[key] = flops / peak if peak else None
    return result


def _our_step(cfg: Config, batch: Batch) -> Any:
    from scaleforge.core.trainer import Trainer

    trainer = Trainer(cfg, Path(tempfile.mkdtemp(prefix="sf-gpu-check-")),
                      data=(itertools.repeat(batch), None))
    return lambda: trainer.train_step(trainer.train_batches)


def _torchtitan_step(run: SpeedRun, cfg: Config, batch: tuple[torch.Tensor, torch.Tensor],
                     device: torch.device) -> Any:
    """torchtitan's step in a one-rank process group, as its trainer runs on one device
    (NCCL on CUDA, gloo on the CPU)."""
    import torch.distributed as dist

    from scaleforge.bench.torchtitan_baseline import torchtitan_step

    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mktemp(prefix="sf-gpu-check-store-"), 1)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
    return torchtitan_step(cfg.model, batch, run.attention, run.compile, device, fp8=run.fp8)


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


def device_name(plan: Plan) -> str:
    if plan.device == "cuda":
        return torch.cuda.get_device_name(0)
    return "cpu (rehearsal)"


def run_all(out_dir: Path, budget_s: float, plan: Plan) -> dict[str, Any]:
    """Every speed run of `plan` within `budget_s` seconds; rewrites the report after each
    run and returns it."""
    deadline = time.monotonic() + budget_s
    report: dict[str, Any] = {"device": device_name(plan), "torch": torch.__version__,
                              "plan": asdict(plan), "runs": []}
    for run in speed_runs(plan):
        left = deadline - time.monotonic()
        record: dict[str, Any] = {"run": asdict(run), "name": run.name}
        if left < 30:
            record["status"] = "skipped: time budget spent"
        elif run.attention == "flash" and not flash_installed():
            record["status"] = "skipped: flash-attn not installed"
        elif run.system == "torchtitan" and run.fp8 != "none" and run.device != "cuda":
            record["status"] = ("skipped: torchtitan's float8 converter refuses a CPU (it "
                                "needs CUDA SM 8.9+; its emulation is eager only), so the "
                                "rehearsal times ours alone")
        else:
            record |= _run_child(run, left)
        print(f"{run.name}: {_summary(record)}", flush=True)
        report["runs"].append(record)
        write_report(report, out_dir)
    return report


def _summary(record: dict[str, Any]) -> str:
    if record.get("status") != "ok":
        return str(record.get("status"))
    mfu = record["mfu_6n_attention"]
    return (f"{record['tokens_per_s']:,.0f} tokens/s (spread {record['spread']:.1%}), MFU "
            f"(6N+attn) {'n/a' if mfu is None else f'{mfu:.1%}'}, "
            f"{record['peak_memory_gib']:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="validate and import only")
    parser.add_argument("--rehearse", action="store_true", help="the CPU twin of the runs")
    parser.add_argument("--out", type=Path, help="OUT_DIR for gpu_check.json and .md")
    parser.add_argument("--budget-s", type=float, default=240.0, help="seconds for all runs")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one SpeedRun as JSON
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry:
        for line in dry_check():
            print(f"dry: {line}")
        print(f"dry: {sum(len(speed_runs(plan_for(m))) for m in (80.0, 141.0, None))} "
              "speed runs checked")
        return
    if args.one:
        result = measure(SpeedRun(**json.loads(args.one)))
        args.result.write_text(json.dumps(result))
        return
    if args.out is None:
        parser.error("give --out OUT_DIR (or --dry)")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.rehearse:
        plan = plan_for(None, rehearse=True)
    else:
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        plan = plan_for(memory)
    report = run_all(args.out, args.budget_s, plan)
    headline = [r for r in report["runs"][:2] if r.get("status") == "ok"]
    sys.exit(0 if len(headline) == 2 else 1)


if __name__ == "__main__":
    main()
