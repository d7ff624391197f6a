"""Metric sinks, written by rank 0 only: console (with a progress bar), JSONL and W&B, with
their settings (`logging.*`, `LoggingConfig`); and this process's peak-memory readings,
which the records carry."""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from tqdm import tqdm

from scaleforge.errors import ConfigError, check_choice

NONFINITE_STRINGS = ("nan", "inf", "-inf")  # how `to_json` writes non-finite floats
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class LoggingConfig:
    """Where metrics go, from rank 0 only. wandb: auto = online with credentials, else offline."""

    wandb: str = "auto"  # auto, online, offline or disabled
    wandb_project: str = "scaleforge"  # the W&B project
    wandb_entity: str | None = None  # the W&B team or user (null: your default)
    run_name: str | None = None  # the W&B run name (null: the run directory's name)
    progress_bar: bool = True  # a tqdm bar on rank 0
    # Also write every logged metric as TensorBoard scalars into RUN_DIR/tensorboard/
    # (needs the tensorboard package: `tensorboard --logdir RUN_DIR/tensorboard`).
    tensorboard: bool = False

    def check(self, prefix: str = "logging") -> None:
        """Raise ConfigError unless `wandb` is a known mode and TensorBoard, when asked
        for, is installed."""
        check_choice(f"{prefix}.wandb", self.wandb, WANDB_MODES)
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                f"{prefix}.tensorboard=true needs the tensorboard package: pip install "
                "tensorboard (it is in the dev extra), or set logging.tensorboard=false"
            )


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory in GiB: on CUDA the most memory `device` had allocated to
    tensors since the last `reset_peak_memory` (or the start); on CPU the process's peak
    resident set size since it started, which cannot be reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def peak_reserved_memory_gb(device: torch.device) -> float | None:
    """The most memory CUDA's caching allocator held on `device` (tensors and its cache)
    since the last `reset_peak_memory` (or the start), in GiB; None on CPU, which has no
    allocator cache."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peaks of `peak_memory_gb` and `peak_reserved_memory_gb` from the memory
    in use now (CUDA); nothing on CPU, where the kernel keeps one peak RSS per process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


WandbMode = Literal["online", "offline", "disabled", "shared"]


def wandb_mode(requested: str, setting: str = "logging.wandb") -> WandbMode:
    """The W&B mode to run in: auto -> online when W&B credentials exist (WANDB_API_KEY or
    ~/.netrc), else offline; another mode as it is. ConfigError naming `setting` for an
    unknown one."""
    if requested != "auto":
        for mode in get_args(WandbMode):
            if requested == mode:
                return mode
        raise ConfigError(
            f"{setting}={requested!r} is not one of auto, {', '.join(get_args(WandbMode))}"
        )
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def _format(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']:>6}"]
    # Per GPU on CUDA (whose records carry memory_reserved_gb), per process on several CPU
    # processes, and the run's own on one.
    per = ("/GPU" if "memory_reserved_gb" in record
           else "/process" if record.get("tflops_total", 0) > record.get("tflops", 0) else "")
    formats = {
        "loss": "loss {:.4f}", "val_loss": "val_loss {:.4f}", "lr": "lr {:.2e}",
        "grad_norm": "gnorm {:.3f}", "tokens_per_s": "{:,.0f} tok/s",
        "tflops": "{:.2f} TFLOP/s" + per, "mfu": "MFU {:.1%}",
        "memory_gb": "mem {:.2f} GiB", "eta_s": "eta {}",
    }
    for key, fmt in formats.items():
        if key not in record:
            continue
        value = record[key]
        if key == "eta_s":
            value = f"{int(value) // 60}m{int(value) % 60:02d}s"
        parts.append(fmt.format(value))
    return " | ".join(parts)


class MetricsLogger:
    """Writes each logged step to the console, `run_dir/metrics.jsonl`, W&B and (with
    logging.tensorboard) TensorBoard, and every console line to `run_dir/train.log`.

    On ranks other than 0 every method is a no-op, so callers never branch on rank.
    """

    def __init__(
        self,
        run_dir: Path,
        logging_cfg: LoggingConfig,
        config: dict[str, Any],
        total_steps: int,
        is_rank0: bool = True,
    ):
        self.enabled = is_rank0
        if not self.enabled:
            return
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        self.jsonl = open(self.jsonl_path, "a", buffering=1)  # noqa: SIM115
        # Every console line of the run, also when no terminal keeps it.
        self.console_log = open(Path(run_dir) / "train.log", "a", buffering=1)  # noqa: SIM115
        show_bar = logging_cfg.progress_bar and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, disable=not show_bar)
        self.tensorboard = None
        if logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.wandb_run = None
        mode = wandb_mode(logging_cfg.wandb)
        if mode != "disabled":
            import wandb

            # Offline, W&B's own banner (some 40 lines at start and end) says nothing the
            # run's one line below does not; online it links the run page, so it stays.
            self.wandb_run = wandb.init(
                project=logging_cfg.wandb_project,
                entity=logging_cfg.wandb_entity,
                name=logging_cfg.run_name,
                dir=str(run_dir),
                config=config,
                mode=mode,
                settings=wandb.Settings(silent=mode != "online"),
            )
            if mode == "offline":
                self.message(f"wandb: offline run in {Path(run_dir) / 'wandb'} (upload it with "
                             "wandb sync)")

    def message(self, text: str) -> None:
        """Print one line without breaking the progress bar."""
        if not self.enabled:
            return
        self.console_log.write(text + "\n")
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def resume_at(self, step: int) -> None:
        """A run resumed from its checkpoint at `step`: drop the records metrics.jsonl holds
        for later steps (logged before the previous start stopped, and about to be logged
        again), say so, and move the progress bar to `step`."""
        if not self.enabled:
            return
        self.jsonl.close()
        lines = self.jsonl_path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if from_json(line)["step"] <= step]
        if len(kept) < len(lines):
            partial = self.jsonl_path.with_suffix(".jsonl.partial")
            partial.write_text("".join(kept))
            os.replace(partial, self.jsonl_path)
            self.message(f"metrics.jsonl: dropped {len(lines) - len(kept)} records after "
                         f"step {step}, the checkpoint this run resumes from")
        self.jsonl = open(self.jsonl_path, "a", buffering=1)  # noqa: SIM115
        self.advance(step)

    def log(self, record: dict[str, Any]) -> None:
        """Record one step's metrics (a dict with at least `step`)."""
        if not self.enabled:
            return
        clean = {k: v for k, v in record.items() if v is not None}
        self.jsonl.write(to_json(clean) + "\n")
        self.message(_format(clean))
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in clean.items() if k != "step"}, step=clean["step"])
        if self.tensorboard is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, int | float):
                    self.tensorboard.add_scalar(key, value, clean["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.jsonl.close()
        self.console_log.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def to_json(value: Any, indent: int | None = None) -> str:
    """`value` (dicts, lists, tuples, numbers, strings) as JSON text; JSON has no NaN or
    infinity, so non-finite floats are written as the strings "nan", "inf" and "-inf" at any
    depth, which keeps the file parseable everywhere. `from_json` reads them back."""
    return json.dumps(_nonfinite_as_strings(value), indent=indent, allow_nan=False)


def from_json(text: str) -> Any:
    """Parse JSON text written by `to_json`: the strings "nan", "inf" and "-inf" become floats
    again, at any depth."""
    return _strings_as_nonfinite(json.loads(text))


def _nonfinite_as_strings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nonfinite_as_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nonfinite_as_strings(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _strings_as_nonfinite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strings_as_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strings_as_nonfinite(v) for v in value]
    if value in NONFINITE_STRINGS:
        return float(value)
    return value
