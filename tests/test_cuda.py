"""CUDA paths of the trainer (bf16, fp16 loss scaling, MFU). Skipped where no GPU is visible;
run on a GPU machine with `pytest tests/test_cuda.py`."""

from __future__ import annotations

import math

import pytest
import torch

from micro_runs import micro_config, synthetic_data
from run_metrics import metrics_records
from scaleforge.core.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _losses(cfg, run_dir, steps=5):
    trainer = Trainer(cfg, run_dir, data=synthetic_data(cfg))
    return [trainer.train_step(trainer.train_batches)[0].item() for _ in range(steps)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_stays_close_to_fp32(tmp_path, precision):
    reference = _losses(micro_config(tmp_path, "trainer.device=cuda"), tmp_path / "fp32")
    cfg = micro_config(tmp_path, "trainer.device=cuda", f"trainer.precision={precision}")
    trainer = Trainer(cfg, tmp_path / precision, data=synthetic_data(cfg))
    assert (trainer.precision.scaler is not None) == (precision == "fp16")
    losses = [trainer.train_step(trainer.train_batches)[0].item() for _ in range(5)]
    assert all(math.isfinite(x) for x in losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=2e-2, atol=0)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 masters


def test_cuda_run_reports_mfu(tmp_path):
    cfg = micro_config(tmp_path, "trainer.device=cuda", "trainer.precision=bf16")
    Trainer(cfg, tmp_path, data=synthetic_data(cfg)).fit()
    records = metrics_records(tmp_path)
    if "H100" in torch.cuda.get_device_name() or "A100" in torch.cuda.get_device_name():
        assert 0 < records[-1]["mfu"] < 1
    assert records[-1]["memory_gb"] > 0
