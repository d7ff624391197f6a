"""The trainer on one CUDA GPU: bf16 and fp16, compile, activation checkpointing, an exact
resume from a checkpoint, MFU and the peak-memory fields. Marked `cuda`: skipped where no
GPU is visible; run on a GPU machine with `pytest -m cuda`. Every test trains llama_micro for a
few steps (seconds each); the compile test also waits for Inductor's first compilation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from micro_runs import cut_and_resume, micro_config, synthetic_data
from run_metrics import logged_losses, metrics_records
from scaleforge.core.flops import peak_flops
from scaleforge.core.trainer import Trainer

pytestmark = pytest.mark.cuda

CUDA = "trainer.device=cuda"
GIB = 2**30


def _losses(cfg, run_dir, steps=5):
    trainer = Trainer(cfg, run_dir, data=synthetic_data(cfg))
    return [trainer.train_step(trainer.train_batches)[0].item() for _ in range(steps)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_stays_close_to_fp32(tmp_path, precision):
    reference = _losses(micro_config(tmp_path, CUDA), tmp_path / "fp32")
    cfg = micro_config(tmp_path, CUDA, f"trainer.precision={precision}")
    trainer = Trainer(cfg, tmp_path / precision, data=synthetic_data(cfg))
    assert (trainer.precision.scaler is not None) == (precision == "fp16")
    losses = [trainer.train_step(trainer.train_batches)[0].item() for _ in range(5)]
    assert all(math.isfinite(x) for x in losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=2e-2, atol=0)
    assert all(p.dtype == torch.float32 for p in trainer.model_parts.parameters())  # fp32 masters


def test_compiled_blocks_on_cuda_train_like_eager(tmp_path):
    runs = {}
    for compiled in (False, True):
        cfg = micro_config(tmp_path, CUDA, f"trainer.compile={str(compiled).lower()}")
        trainer = Trainer(cfg, tmp_path / str(compiled), data=synthetic_data(cfg))
        runs[compiled] = [trainer.train_step(trainer.train_batches)[0].item() for _ in range(3)]
        assert (trainer.model_parts[0].layers["0"]._compiled_call_impl is not None) == compiled
    # Inductor fuses the norms and pointwise ops into Triton kernels that sum in another
    # order than eager's: equal to float32 rounding, not bitwise.
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=1e-4,
                               atol=0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_on_cuda_trains_like_none(tmp_path, mode):
    reference = _losses(micro_config(tmp_path, CUDA), tmp_path / "none", steps=3)
    cfg = micro_config(tmp_path, CUDA, f"trainer.activation_checkpointing={mode}")
    trainer = Trainer(cfg, tmp_path / mode, data=synthetic_data(cfg))
    assert type(trainer.model_parts[0].layers["0"]).__name__ == "CheckpointWrapper"
    losses = [trainer.train_step(trainer.train_batches)[0].item() for _ in range(3)]
    # The recomputed forward is the same kernels on the same inputs; the fused attention
    # backward accumulates with atomics, so gradients may differ in the last bits.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)


def _fit(run_dir, *overrides: str) -> Trainer:
    """Six steps of two micro-batches each on 20 samples (epochs end inside steps 3 and 5)."""
    cfg = micro_config(run_dir, CUDA, "trainer.max_steps=6", *overrides)
    trainer = Trainer(cfg, run_dir, data=synthetic_data(cfg, num_windows=20))
    trainer.fit()
    return trainer


def test_resume_on_cuda_continues_with_bitwise_equal_losses(tmp_path):
    # The math attention backend: the flash and memory-efficient kernels' backward passes
    # accumulate with atomics, so even two uninterrupted runs could differ in the last bit.
    with sdpa_kernel(SDPBackend.MATH):
        _, resumed = cut_and_resume(_fit, tmp_path, 3)  # trainer.resume=auto by default
    resumed_dir = tmp_path / "resumed"
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step_3"
    reference, after = logged_losses(tmp_path / "full"), logged_losses(resumed_dir)
    assert sorted(after) == [4, 5, 6]
    assert all(after[s] == reference[s] for s in after), (after, reference)


def test_cuda_run_reports_mfu_per_gpu_between_zero_and_one(tmp_path):
    cfg = micro_config(tmp_path, CUDA, "trainer.precision=bf16")
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    trainer.fit()
    name = torch.cuda.get_device_name(trainer.device)
    peak = peak_flops(trainer.device, "bf16")
    if "H100" in name or "H200" in name:
        assert peak is not None, f"{name!r} is missing from core/flops.py's peak table"
    records = [r for r in metrics_records(tmp_path) if "loss" in r]
    assert records
    for record in records:
        assert record["tflops"] == pytest.approx(record["tflops_total"])  # one GPU
        if peak is None:
            assert "mfu" not in record and "mfu_full_attention" not in record
            continue
        assert 0 < record["mfu"] < record["mfu_full_attention"] < 1
        assert record["mfu"] == pytest.approx(record["tflops"] * 1e12 / peak)


def test_peak_memory_is_reset_after_start_up_and_after_each_log_line(tmp_path):
    # llama_micro's weights, optimizer state and activations take a few MiB: a 1 GiB tensor
    # allocated and freed at once shows in exactly the interval it fell in.
    cfg = micro_config(tmp_path, CUDA, "trainer.max_steps=4")
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))

    def allocate_and_free_one_gib() -> None:
        spike = torch.empty(GIB, dtype=torch.uint8, device=trainer.device)
        del spike

    allocate_and_free_one_gib()  # during start-up: after it the peak starts again
    train_step = trainer.train_step

    def train_step_with_a_spike_in_step_2(batches):
        result = train_step(batches)
        if trainer.step == 2:
            allocate_and_free_one_gib()
        return result

    trainer.train_step = train_step_with_a_spike_in_step_2
    trainer.fit()
    records = {r["step"]: r for r in metrics_records(tmp_path) if "loss" in r}
    assert sorted(records) == [1, 2, 3, 4]
    memory = {step: record["memory_gb"] for step, record in records.items()}
    assert memory[2] >= 1.0
    assert max(memory[1], memory[3], memory[4]) < 0.5, memory
    for record in records.values():
        assert record["memory_reserved_gb"] >= record["memory_gb"]
