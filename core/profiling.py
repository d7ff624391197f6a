"""`trainer.profile_steps=[a,b]`: a torch.profiler trace of steps a to b on every rank.

Each rank writes `RUN_DIR/profile/rank<R>_steps<a>-<b>.json`, a Chrome trace (open it in
Perfetto, https://ui.perfetto.dev, or chrome://tracing) of CPU and, on CUDA, GPU activity
with shapes and memory; on CUDA also `rank<R>_steps<a>-<b>_memory.pickle`, the caching
allocator's snapshot (drag it into https://pytorch.org/memory_viz).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from scaleforge.errors import ConfigError
from scaleforge.torch_compat import dump_cuda_memory_snapshot, record_cuda_memory_history


def check_profile_steps(steps: list[int], max_steps: int, setting: str) -> None:
    """ConfigError unless `steps` is [] or [a, b] with 1 <= a <= b <= max_steps."""
    if not steps:
        return
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1] <= max_steps:
        raise ConfigError(
            f"{setting}={steps} must be [first, last] steps with 1 <= first <= last <= "
            f"trainer.max_steps={max_steps} (or [] for no trace)"
        )


class StepProfiler:
    """Profiles the steps `steps` = [a, b] (none when empty) of this rank; `before_step(n)`
    and `after_step(n)` are called around every step n."""

    def __init__(self, steps: list[int], run_dir: Path, rank: int, device: torch.device):
        self.window = tuple(steps)
        self.run_dir, self.rank, self.device = run_dir, rank, device
        self.profiler: profile | None = None

    @property
    def stem(self) -> str:
        return f"rank{self.rank}_steps{self.window[0]}-{self.window[1]}"

    def before_step(self, step: int) -> None:
        if not self.window or step != self.window[0]:
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            record_cuda_memory_history(True)
        self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profiler.__enter__()

    def after_step(self, step: int) -> Path | None:
        """Stop and write the trace after the window's last step; return its path."""
        if self.profiler is None or step != self.window[1]:
            return None
        self.profiler.__exit__(None, None, None)
        out = self.run_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        trace = out / f"{self.stem}.json"
        self.profiler.export_chrome_trace(str(trace))
        self.profiler = None
        if self.device.type == "cuda":
            dump_cuda_memory_snapshot(str(out / f"{self.stem}_memory.pickle"))
            record_cuda_memory_history(False)
        return trace
