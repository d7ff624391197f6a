"""The speed and memory fields of the metrics records (core/throughput.py) in a real
two-process run: FLOP/s and MFU per GPU, both FLOP conventions, memory as the largest of any
rank. CPU has no known peak and one process's memory cannot be made to differ on cue, so the
rank function stubs the peak and the per-rank memory readings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import scaleforge.core.throughput as throughput
from distributed import run_distributed_test
from micro_runs import micro_config, synthetic_data
from run_metrics import metrics_records
from scaleforge.core.config import Config
from scaleforge.core.flops import fp8_peak_flops, fp8_peak_flops_by_name, training_flops_per_token
from scaleforge.core.metrics import _format
from scaleforge.core.trainer import Trainer, start_topology

PEAK_FLOPS = 1e10  # a stub peak, of the order of a CPU core's, so the MFU is not tiny
FP8_PEAK_FLOPS = 2e10  # a stub float8 peak (mfu_fp8)
MEMORY_GB_BY_RANK = (1.5, 2.25)  # rank 1, which does not log, has the larger peak


def _fit_with_stubbed_readings(cfg: Config) -> None:
    rank = dist.get_rank()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(throughput, "peak_flops", lambda device, precision: PEAK_FLOPS)
        patch.setattr(throughput, "fp8_peak_flops", lambda device: FP8_PEAK_FLOPS)
        patch.setattr(throughput, "peak_memory_gb", lambda device: MEMORY_GB_BY_RANK[rank])
        topology = start_topology(cfg, dist.get_world_size())
        data = synthetic_data(cfg, dp_rank=topology.dp_rank, dp_size=topology.dp_size)
        Trainer(cfg, Path(cfg.run_dir), topology.world_size, data=data,
                topology=topology).fit()


def test_dp_shard2_reports_flops_and_mfu_per_gpu_and_memory_max_over_ranks(tmp_path):
    cfg = micro_config(tmp_path, "parallel.dp_shard=2", "trainer.max_steps=3")
    run_distributed_test(_fit_with_stubbed_readings, world_size=2, func_args=(cfg,))
    causal = training_flops_per_token(cfg.model, cfg.data.seq_len, causal=True)
    full = training_flops_per_token(cfg.model, cfg.data.seq_len, causal=False)
    records = [r for r in metrics_records(tmp_path) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        # tokens_per_s is the global rate (both replicas); FLOP/s and MFU are per GPU
        assert record["tflops_total"] == pytest.approx(record["tokens_per_s"] * causal / 1e12)
        assert record["tflops"] == pytest.approx(record["tflops_total"] / 2)
        assert record["mfu"] == pytest.approx(record["tflops"] * 1e12 / PEAK_FLOPS)
        assert record["mfu_fp8"] == pytest.approx(record["tflops"] * 1e12 / FP8_PEAK_FLOPS)
        assert record["mfu_full_attention"] == pytest.approx(record["mfu"] * full / causal)
        assert record["mfu_full_attention"] > record["mfu"]
        assert record["memory_gb"] == max(MEMORY_GB_BY_RANK)
        assert "memory_reserved_gb" not in record  # CPU: no caching allocator


def test_startup_line_names_the_flop_convention_of_mfu(tmp_path, capsys):
    cfg = micro_config(tmp_path, "trainer.max_steps=2")
    Trainer(cfg, tmp_path, data=synthetic_data(cfg)).fit()
    causal = training_flops_per_token(cfg.model, cfg.data.seq_len, causal=True) / 1e6
    full = training_flops_per_token(cfg.model, cfg.data.seq_len, causal=False) / 1e6
    startup = capsys.readouterr().out.splitlines()[0]
    assert f"MFU counts causal attention: {causal:,.2f} MFLOP/token" in startup
    assert f"mfu_full_attention: {full:,.2f} MFLOP/token" in startup
    assert f"{causal:,.2f}" != f"{full:,.2f}"  # the two conventions differ at this size


def test_the_console_line_says_per_gpu_only_on_gpus():
    """TFLOP/s per GPU on CUDA (its records have memory_reserved_gb), per process on several
    CPU processes, the run's own on one."""
    one = {"step": 1, "tflops": 0.02, "tflops_total": 0.02}
    assert _format(one).endswith("0.02 TFLOP/s")
    assert "0.02 TFLOP/s/process" in _format(one | {"tflops_total": 0.04})
    assert "0.02 TFLOP/s/GPU" in _format(one | {"memory_reserved_gb": 1.0})


def test_fp8_peaks_are_half_the_sheets_sparse_figures_and_none_without_fp8_cores():
    assert fp8_peak_flops_by_name("NVIDIA H100 80GB HBM3") == 1979e12
    assert fp8_peak_flops_by_name("NVIDIA H100 NVL") == 1670.5e12
    assert fp8_peak_flops_by_name("NVIDIA H200") == 1979e12
    assert fp8_peak_flops_by_name("NVIDIA A100-SXM4-80GB") is None
    assert fp8_peak_flops(torch.device("cpu")) is None
