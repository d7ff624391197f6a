"""model.kernels=fused trains like model.kernels=torch: llama_micro's per-step losses, grad
norms and validation loss within 1e-5 relative over 20 fp32 steps, in one process and
under tp2 and dp_shard2 (gloo); each fused operator is really called with fused, none
with torch.

Under tp2 the norms run on sequence-sharded DTensors (csrc/sharding.py) and the loss stays
vocabulary-parallel on the logits; under dp_shard2 the fused loss reads the head weight
FSDP's root gathered for the body's forward and keeps until backward (`Transformer.loss`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import scaleforge.models.transformer as transformer
from distributed import run_distributed_test
from layout_runs import COMMON, PIPELINE_MODEL, run_layout, train_and_record
from micro_runs import micro_config

STEPS = 20
LOSS_RTOL = 1e-5
FUSED_FUNCTIONS = ("fused_rms_norm", "fused_rope", "fused_swiglu", "fused_linear_cross_entropy")


def train_counting_fused_calls(cfg: Any, run_dir: Path, world_size: int) -> dict[str, Any]:
    """train_and_record, plus "calls": how often each fused function of the model ran."""
    calls: Counter[str] = Counter()
    originals = {name: getattr(transformer, name) for name in FUSED_FUNCTIONS}

    def counting(name: str):
        def call(*args: Any) -> Any:
            calls[name] += 1
            return originals[name](*args)
        return call

    for name in FUSED_FUNCTIONS:
        setattr(transformer, name, counting(name))
    try:
        record = train_and_record(cfg, run_dir, STEPS, world_size)
    finally:
        for name, function in originals.items():
            setattr(transformer, name, function)
    return {**record, "calls": dict(calls)}


def _in_rank(cfg: Any, run_dir: Path) -> dict[str, Any]:
    return train_counting_fused_calls(cfg, run_dir, dist.get_world_size())


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("torch_kernels")
    cfg = micro_config(run_dir, *COMMON, "model.kernels=torch")
    return train_counting_fused_calls(cfg, run_dir, world_size=1)


def assert_trains_alike(result: dict[str, Any], reference: dict[str, Any]) -> None:
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]),
                               rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(result["grad_norms"]),
                               torch.tensor(reference["grad_norms"]), rtol=LOSS_RTOL, atol=0)
    assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=LOSS_RTOL)


def test_fused_kernels_train_like_torch_in_one_process(tmp_path, torch_reference):
    cfg = micro_config(tmp_path, *COMMON, "model.kernels=fused")
    result = train_counting_fused_calls(cfg, tmp_path, world_size=1)
    assert_trains_alike(result, torch_reference)
    assert set(result["calls"]) == set(FUSED_FUNCTIONS), result["calls"]


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.dp_shard=2"])
def test_fused_kernels_train_like_torch_under_a_parallel_layout(tmp_path, torch_reference,
                                                                layout):
    cfg = micro_config(tmp_path, *COMMON, "model.kernels=fused", layout)
    result = run_distributed_test(_in_rank, world_size=2, func_args=(cfg, tmp_path))[0]
    assert_trains_alike(result, torch_reference)
    # Under tp the loss stays on the vocabulary-sharded logits (models/loss.py).
    expected = set(FUSED_FUNCTIONS) - ({"fused_linear_cross_entropy"} if "tp" in layout else set())
    assert set(result["calls"]) == expected, result["calls"]


def test_torch_kernels_call_no_fused_operator(torch_reference):
    assert torch_reference["calls"] == {}


@pytest.mark.slow
def test_fused_kernels_in_pipeline_stages_train_like_torch(tmp_path):
    # pp2: each stage runs the fused norms, rope and swiglu; the last stage's logits go to
    # the schedule's loss. About 30 s (two processes, a 4-layer model).
    reference_cfg = micro_config(tmp_path / "torch", *COMMON, *PIPELINE_MODEL,
                                 "model.kernels=torch")
    reference = train_and_record(reference_cfg, tmp_path / "torch", 5, world_size=1)
    cfg = micro_config(tmp_path / "fused", *COMMON, *PIPELINE_MODEL, "model.kernels=fused",
                       "parallel.pp=2")
    assert_trains_alike(run_layout(cfg, 2, 5), reference)


@pytest.mark.slow
def test_fused_kernels_under_compile_and_activation_checkpointing_train_like_torch(tmp_path):
    # Compiled blocks trace the operators through their fake kernels; checkpointed blocks
    # recompute them in backward. Inductor's first compilation takes about a minute on CPU.
    settings = [*COMMON, "trainer.compile=true", "trainer.activation_checkpointing=full"]
    results = {}
    for kernels in ("torch", "fused"):
        cfg = micro_config(tmp_path / kernels, *settings, f"model.kernels={kernels}")
        results[kernels] = train_and_record(cfg, tmp_path / kernels, 3, world_size=1)
    assert_trains_alike(results["fused"], results["torch"])
