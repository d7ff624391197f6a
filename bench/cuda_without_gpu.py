"""`python -m scaleforge.bench.cuda_without_gpu`: the CUDA code paths, exercised on a machine
without a GPU under a CUDA build of torch (PyPI's default Linux wheel, which runs on the
CPU); one line per check, exit status 1 when any fails.

Checks:
- `csrc`: the kernel library (scaleforge.csrc) built with its CUDA sources, binding and
  kernels, for sm_90 (TORCH_CUDA_ARCH_LIST, default 9.0) with the machine's nvcc, loaded,
  and every `torch.ops.scaleforge` operator with a CUDA kernel in torch's dispatcher;
- one training step of each layout in `LAYOUTS` on fake CUDA tensors over torch's fake
  process group (bench/fake_cuda.py: bf16, llama_micro), as rank 0 of the layout's world,
  through the trainer's own code (`Trainer` built from a config, then `train_step`, and
  `evaluate` where the layout says). Each asserts: no device mismatch, every collective's
  tensors on CUDA, no host sync but the project's own (`fake_cuda.ALLOWED_HOST_READS`; and
  evaluation's result, the float it returns), and the matmuls in bf16.

What a fake step does not run: backward. torch's autograd engine stashes the CUDA streams
of the devices it runs on and asks the driver for each device's context (`hasPrimaryContext`),
which fails without a GPU; so `loss.backward()` and the pipeline's stage backward are
replaced by gradient stand-ins (zeros for every parameter and every received activation,
`fake_cuda.gradients_stood_in`), and the collectives and host syncs of backward itself
(FSDP's reduce-scatter, tensor parallelism's backward all-reduces, the pipeline's gradient
sends) are not exercised here: bench/gpu_check.sh does that on a GPU. Everything around
it is: forward, loss, clipping's norm reduction, the health decision, the optimizer step,
MoE's bias update, evaluation.

`--layouts a,b` runs only those layouts; `--no-build` skips the kernel build.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from scaleforge.bench.fake_cuda import (
    fake_cuda_tensors,
    fake_cuda_world,
    gradients_stood_in,
    has_cuda_build,
    innermost_line_of_ours,
    pipeline_shapes_given,
)
from scaleforge.core.config import Config, compose, to_config
from scaleforge.core.precision import build_precision
from scaleforge.core.trainer import Trainer, start_topology
from scaleforge.data_pipeline.batch import Batch
from scaleforge.errors import KernelBuildError
from scaleforge.parallel.context_parallel import batch_columns
from scaleforge.parallel.data_parallel import autocast_precision
from scaleforge.parallel.topology import Topology
from scaleforge.torch_compat import (
    DataDependentOutputException,
    has_kernel_for,
    is_fake_device_mismatch,
    operator_names,
)

# llama_micro in bf16 on CUDA, 2 micro-batches of 4 x 64 tokens per step in one process.
BASE = [
    "model=llama_micro",
    "data.vocab_size=512",
    "data.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.global_batch_tokens=512",
    "trainer.device=cuda",
    "trainer.precision=bf16",
    "trainer.max_steps=2",
    "optim.warmup_steps=1",
    "trainer.eval_batches=4",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
]
MOE = ["model.moe.num_experts=4", "model.moe.expert_hidden=32", "model.moe.aux_loss_coef=0.01",
       "model.moe.bias_update_rate=0.01"]
PIPELINE = ["trainer.micro_batch_size=2", "model.n_layers=4"]
# name -> (overrides, whether the check also evaluates)
LAYOUTS: dict[str, tuple[list[str], bool]] = {
    "single": ([], True),
    "tp2": (["parallel.tp=2"], False),
    "dp_shard2": (["parallel.dp_shard=2"], True),
    "pp2_1f1b": (["parallel.pp=2", "parallel.pp_schedule=1F1B", *PIPELINE], True),
    "pp2_zbv": (["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble",
                 "parallel.pp_stages_per_rank=2", *PIPELINE], True),
    "cp2": (["parallel.cp=2", "parallel.cp_impl=allgather"], False),
    "ep2_moe": (["parallel.dp_shard=2", "parallel.ep=2", *MOE], False),
    "tp2_pp2_dp_shard2": (["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=2",
                           *PIPELINE], False),
}
WORLD_AXES = ("tp", "pp", "cp", "dp_replicate", "dp_shard")


@dataclass
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def check_kernel_build() -> Check:
    """Build (or load the cached) kernel library with its CUDA sources and ask the
    dispatcher for each operator's CUDA kernel. (`import scaleforge.csrc` builds.)"""
    import torch.utils.cpp_extension as cpp_extension

    name = "csrc CUDA extension"
    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "include" / "cuda_runtime_api.h").exists():
        return Check(name, False, f"CUDA_HOME={home} has no include/cuda_runtime_api.h (torch "
                                  "guesses it from the nvcc on PATH): set CUDA_HOME to the "
                                  "CUDA toolkit, e.g. /usr/local/cuda")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    start = time.perf_counter()
    try:
        import scaleforge.csrc  # noqa: F401
        from scaleforge.csrc.extension import cuda_wanted, load
    except KernelBuildError as error:
        return Check(name, False, str(error))
    seconds = time.perf_counter() - start
    if not cuda_wanted():
        return Check(name, False, "built without its CUDA sources (nvcc not found)")
    operators = operator_names("scaleforge")
    missing = [op for op in operators if not has_kernel_for(op, "CUDA")]
    if not operators or missing:
        return Check(name, False, f"no CUDA kernel for {missing or 'any operator'}")
    arch = os.environ["TORCH_CUDA_ARCH_LIST"].replace(".", "")
    return Check(name, True, f"binding + kernels for sm_{arch} "
                             f"built (or loaded from {load()}) in {seconds:.0f} s; a CUDA "
                             f"kernel registered for each of the {len(operators)} operators")


def layout_config(overrides: list[str], run_dir: Path) -> Config:
    """The check's config: BASE with `overrides`."""
    return to_config(compose([*BASE, *overrides, f"run_dir={run_dir}"]))


class _FakeBatches:
    """Micro-batches of token ids in host memory, as the loaders yield them; also the
    validation source (`batches(n)`)."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int):
        self.shape, self.vocab_size = (batch_size, seq_len), vocab_size

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self._batch()

    def batches(self, num_batches: int) -> Iterator[Batch]:
        return (self._batch() for _ in range(num_batches))

    def first_stage_inputs(self, topology: Topology) -> torch.Tensor:
        """One micro-batch's token ids as the first pipeline stage receives them: this cp
        rank's columns, on the device."""
        inputs = self._batch().inputs
        if (columns := batch_columns(topology, self.shape[1])) is not None:
            inputs = torch.cat([inputs[:, part] for part in columns], dim=1)
        return inputs.to(topology.device)

    def _batch(self) -> Batch:
        return Batch(torch.randint(0, self.vocab_size, self.shape),
                     torch.randint(0, self.vocab_size, self.shape))


def _failure(error: BaseException) -> str:
    """What went wrong, and the innermost line of ours where."""
    where = innermost_line_of_ours(traceback.extract_tb(error.__traceback__))
    if isinstance(error, DataDependentOutputException):
        return f"host sync ({error.func}) at {where}"
    if is_fake_device_mismatch(error):
        return f"device mismatch ({str(error).splitlines()[0]}) at {where}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__} ({first[:200]}) at {where}"


def _evaluation_read(trainer: Trainer) -> str | None:
    """Run `trainer.evaluate()`; None when its only host read is its result (the float it
    returns: the read of a fake tensor raises there), else what failed."""
    try:
        trainer.evaluate()
    except DataDependentOutputException as error:
        frame = innermost_line_of_ours(traceback.extract_tb(error.__traceback__))
        if frame.endswith("(evaluate)"):
            return None
        return _failure(error)
    except Exception as error:  # noqa: BLE001 (reported as the check's failure)
        return _failure(error)
    return "evaluate returned without reading its result"


def check_layout(name: str, overrides: list[str], evaluate: bool = False,
                 plant: Callable[[Trainer], AbstractContextManager] | None = None) -> Check:
    """One training step (and evaluation when `evaluate`) of the layout `overrides` on
    fake CUDA tensors, as rank 0 (module doc); `plant(trainer)` wraps the step (the tests
    plant bugs with it)."""
    check = f"fake-CUDA step {name}"
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = layout_config(overrides, Path(run_dir))
        # dp_shard -1 takes the rest of the world: 1 where the other axes make it.
        world = math.prod(max(getattr(cfg.parallel, axis), 1) for axis in WORLD_AXES)
        assert cfg.data.vocab_size is not None  # BASE sets it
        batches = _FakeBatches(cfg.trainer.micro_batch_size, cfg.data.seq_len,
                               cfg.data.vocab_size)
        with fake_cuda_world(world):
            topology = start_topology(cfg, world)
            with fake_cuda_tensors() as watch, pipeline_shapes_given(
                    lambda: batches.first_stage_inputs(topology),
                    lambda: build_precision(autocast_precision(cfg.trainer.precision, topology),
                                            topology.device).autocast()):
                try:
                    trainer = Trainer(cfg, Path(run_dir), data=(iter(batches), batches),
                                      topology=topology)
                    built, reads_before = len(watch.calls), len(watch.allowed_reads)
                    with (plant(trainer) if plant else contextlib.nullcontext(),
                          gradients_stood_in(trainer.model_parts.parameters)):
                        loss, _ = trainer.train_step(trainer.train_batches)
                except Exception as error:  # noqa: BLE001 (the check's failure)
                    return Check(check, False, _failure(error))
                step_calls = len(watch.calls) - built
                reads = Counter(watch.allowed_reads[reads_before:])
                problem = _evaluation_read(trainer) if evaluate else None
        if problem is not None:
            return Check(check, False, f"evaluation: {problem}")
        if loss.device.type != "cuda":
            return Check(check, False, f"the step's loss is on {loss.device}")
        if off := watch.off_device():
            return Check(check, False, "; ".join(
                f"{call.op} given tensors on {call.devices} at {call.where}" for call in off))
        if world > 1 and step_calls == 0:
            return Check(check, False, "no collective seen in the step")
        matmuls = [dtypes for _, dtypes in watch.ops]
        low = sum(all(dtype == torch.bfloat16 for dtype in dtypes) for dtypes in matmuls)
        if not low:
            return Check(check, False, f"no matmul ran in bf16 ({len(matmuls)} matmuls)")
    evaluated = ", evaluation" if evaluate else ""
    allowed = ", ".join(f"{read} x{count}" for read, count in sorted(reads.items()))
    return Check(check, True, f"step{evaluated} on cuda; {step_calls} collectives in the step, "
                              f"all on CUDA; host reads: only the allowed ({allowed}); "
                              f"{low} of {len(matmuls)} matmuls in bf16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated, of: {', '.join(LAYOUTS)}")
    parser.add_argument("--no-build", action="store_true", help="skip the csrc CUDA build")
    args = parser.parse_args(argv)
    # One line per check: torch's warnings about the layouts themselves (DTensor's
    # redistribution plans, FSDP's view outputs) are not this report's.
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    if not has_cuda_build():
        print(f"FAIL  torch {torch.__version__} is not a CUDA build: install PyPI's default "
              "wheel (pip install torch), which runs on the CPU")
        return 1
    checks: list[Check] = []
    if not args.no_build:
        checks.append(check_kernel_build())
        print(checks[-1].line(), flush=True)
    for name in args.layouts.split(","):
        if name not in LAYOUTS:
            parser.error(f"unknown layout {name!r}; choose from {', '.join(LAYOUTS)}")
        overrides, evaluate = LAYOUTS[name]
        start = time.perf_counter()
        checks.append(check_layout(name, overrides, evaluate))
        print(f"{checks[-1].line()} ({time.perf_counter() - start:.1f} s)", flush=True)
    failed = sum(not check.ok for check in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
