"""CUDA without a GPU (bench/cuda_without_gpu.py, bench/fake_cuda.py): a training step on fake
CUDA tensors over torch's fake process group passes its checks (no device mismatch, every
collective's tensors on CUDA, no host sync but the project's own, bf16 matmuls), and each
check fails on a bug planted in the step: a CPU tensor handed to a collective, an `.item()`.

Needs a CUDA build of torch (PyPI's default Linux wheel; it runs on the CPU): skipped under
the CPU build `make test` installs. `.ci/cuda_without_gpu.sh` runs these under torch 2.11
and `python -m scaleforge.bench.cuda_without_gpu`, which checks every layout (the layouts
past `single` are marked slow here)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from scaleforge.bench.cuda_without_gpu import LAYOUTS, check_layout
from scaleforge.bench.fake_cuda import has_cuda_build
from scaleforge.core.trainer import Trainer

pytestmark = pytest.mark.skipif(
    not has_cuda_build(),
    reason=f"needs a CUDA build of torch (PyPI's default wheel, runs on the CPU); "
           f"torch {torch.__version__} is a CPU build")


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[] if name == "single" else pytest.mark.slow) for name in LAYOUTS])
def test_fake_cuda_step_passes_every_check(name):
    overrides, evaluate = LAYOUTS[name]
    check = check_layout(name, overrides, evaluate)
    assert check.ok, check.line()


@contextlib.contextmanager
def _after_forward(trainer: Trainer, planted) -> Iterator[None]:
    """Run `planted(output)` after each forward of the trainer's model."""
    handle = trainer.model_parts[0].register_forward_hook(
        lambda module, inputs, output: planted(output))
    try:
        yield
    finally:
        handle.remove()


def test_a_cpu_tensor_handed_to_a_collective_fails_the_check():
    def all_reduce_on_host(output: torch.Tensor) -> None:
        dist.all_reduce(torch.zeros(1))  # made without device=: a host tensor

    check = check_layout("tp2", LAYOUTS["tp2"][0],
                         plant=lambda trainer: _after_forward(trainer, all_reduce_on_host))
    assert not check.ok
    assert "c10d.allreduce_.default given tensors on ['cpu']" in check.detail, check.line()


def test_a_host_read_in_the_step_fails_the_check():
    check = check_layout("single", [], plant=lambda trainer: _after_forward(
        trainer, lambda output: output.float().sum().item()))
    assert not check.ok
    assert check.detail.startswith("host sync (aten._local_scalar_dense.default)"), check.line()


def test_a_device_mismatch_in_the_step_fails_the_check():
    check = check_layout("single", [], plant=lambda trainer: _after_forward(
        trainer, lambda output: output + torch.ones(output.shape[-1])))
    assert not check.ok
    assert check.detail.startswith("device mismatch"), check.line()
