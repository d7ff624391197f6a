"""Kernel numerics per device (core/precision.py set_numerics): deterministic by default on
CPU and opt-in on CUDA, TF32 matmuls on CUDA unless trainer.tf32=false. The CUDA branch only
sets flags and an environment variable, so it is exercised here with a CUDA device object."""

from __future__ import annotations

import os

import pytest
import torch

from micro_runs import micro_config, synthetic_data
from scaleforge.core.config import compose, to_config
from scaleforge.core.precision import (
    resolve_deterministic,
    resolve_precision,
    set_numerics,
    tf32_enabled,
)
from scaleforge.core.trainer import Trainer

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def restore_numerics(monkeypatch):
    """Put torch's global flags back as they were after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    tf32 = tf32_enabled()
    yield
    set_numerics(False, tf32, CUDA)  # TF32 back; touches nothing else when not deterministic
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def test_deterministic_auto_is_on_for_cpu_and_off_for_cuda():
    assert resolve_deterministic(None, CPU) and not resolve_deterministic(None, CUDA)
    assert resolve_deterministic(True, CUDA) and not resolve_deterministic(False, CPU)


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice stays
    expected = "bf16" if torch.cuda.is_available() else "fp32"
    assert resolve_precision("auto", "auto") == expected


def test_cpu_run_defaults_to_fp32(tmp_path, restore_numerics):
    assert to_config(compose()).trainer.precision == "auto"  # the shipped default
    cfg = micro_config(tmp_path, "trainer.precision=auto")
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    assert cfg.trainer.precision == "fp32" and trainer.precision.name == "fp32"
    saved = (tmp_path / "config.yaml").read_text()
    assert "precision: fp32" in saved  # the run records what it ran in


def test_cuda_defaults_take_tf32_and_default_kernels(restore_numerics):
    set_numerics(None, True, CUDA)
    assert tf32_enabled() and not torch.are_deterministic_algorithms_enabled()
    set_numerics(None, False, CUDA)  # trainer.tf32=false: strict IEEE fp32
    assert not tf32_enabled()


def test_deterministic_on_cuda_is_strict_and_fixes_the_cublas_workspace(restore_numerics):
    set_numerics(True, True, CUDA)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.utils.deterministic.fill_uninitialized_memory  # no NaN-filled buffers


def test_cpu_trainer_runs_deterministic_and_leaves_tf32_alone(tmp_path, restore_numerics):
    set_numerics(False, False, CUDA)
    cfg = micro_config(tmp_path)
    assert cfg.trainer.deterministic is None and cfg.trainer.tf32
    Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    assert torch.are_deterministic_algorithms_enabled() and not tf32_enabled()
