"""Expert parallelism (parallel/expert_parallel.py) in real gloo processes against the
single-process MoE run of the same model and data: per-step losses, grad norms and final
weights (experts, router, expert bias included) within the layout tests' fp32 tolerances;
an ep2 checkpoint resumed in one process (ep1); the layout's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layout_runs import (
    COMMON,
    LOSS_RTOL,
    PIPELINE_MODEL,
    WEIGHT_ATOL,
    WEIGHT_RTOL,
    run_layout,
    train_and_record,
)
from micro_runs import micro_config
from scaleforge.core.checkpoint.paths import is_complete, read_info, step_dir
from scaleforge.core.config import Config, validate
from scaleforge.errors import ConfigError
from scaleforge.models.init import canonical_name

STEPS, STOP = 4, 2
# llama_micro with 4 experts of width 32, top 2, in both layers; both balancing mechanisms.
MOE = ["model.moe.num_experts=4", "model.moe.expert_hidden=32", "model.moe.aux_loss_coef=0.01",
       "model.moe.bias_update_rate=0.01"]
EXPERT = "layers.0.feed_forward.experts.w1"


def _placements(result: dict) -> dict:
    """name (without module wrappers' prefixes) -> (mesh shape, placements)."""
    return {canonical_name(name): value for name, value in result["placements"].items()}


def _config(tmp_path: Path, name: str, *overrides: str) -> Config:
    return micro_config(tmp_path / name, *COMMON, *MOE, *overrides)


def _reference(tmp_path: Path, *overrides: str) -> dict:
    return train_and_record(_config(tmp_path, "reference", *overrides), tmp_path / "reference",
                            STEPS, 1)


def _assert_matches(result: dict, reference: dict, start: int = 0) -> None:
    """Losses and grad norms within LOSS_RTOL, final weights and buffers within the layout
    tests' tolerances, from step `start` of the reference on."""
    torch.testing.assert_close(torch.tensor(result["losses"]),
                               torch.tensor(reference["losses"][start:]), rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(result["grad_norms"]),
                               torch.tensor(reference["grad_norms"][start:]), rtol=LOSS_RTOL,
                               atol=0)
    assert result["final"].keys() == reference["final"].keys()
    assert "layers.1.feed_forward.expert_bias" in result["final"]
    for name, tensor in reference["final"].items():
        torch.testing.assert_close(result["final"][name], tensor, rtol=WEIGHT_RTOL,
                                   atol=WEIGHT_ATOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("extra", [[], ["trainer.activation_checkpointing=full"]],
                         ids=["ep2", "ep2_full_ac"])
def test_ep2_matches_single_process_in_fp32(tmp_path: Path, extra: list[str]) -> None:
    reference = _reference(tmp_path)
    result = run_layout(_config(tmp_path, "ep2", "parallel.dp_shard=2", "parallel.ep=2",
                                *extra), 2, STEPS)
    assert _placements(result)[EXPERT] == ((2,), "(Shard(dim=0),)")  # two experts each
    _assert_matches(result, reference)


@pytest.mark.slow
def test_ep2_tp2_matches_single_process_in_fp32(tmp_path: Path) -> None:
    reference = _reference(tmp_path)
    result = run_layout(_config(tmp_path, "ep2_tp2", "parallel.dp_shard=2", "parallel.ep=2",
                                "parallel.tp=2"), 4, STEPS)
    assert _placements(result)[EXPERT] == ((2,), "(Shard(dim=0),)")
    assert _placements(result)["layers.0.attention.wq.weight"][0] == (2, 2)  # dp x tp
    _assert_matches(result, reference)


@pytest.mark.slow
def test_pp2_ep2_matches_single_process_in_fp32(tmp_path: Path) -> None:
    """Pipeline stages with expert parallelism; torch's first-step shape inference must not
    count as routed tokens (the expert bias would move differently)."""
    reference = _reference(tmp_path, *PIPELINE_MODEL)
    result = run_layout(_config(tmp_path, "pp2_ep2", *PIPELINE_MODEL, "parallel.pp=2",
                                "parallel.dp_shard=2", "parallel.ep=2"), 4, STEPS)
    _assert_matches(result, reference)


def test_ep2_checkpoint_resumes_under_ep1(tmp_path: Path) -> None:
    reference = _reference(tmp_path)
    saved = run_layout(_config(tmp_path, "saved", "parallel.dp_shard=2", "parallel.ep=2"), 2,
                       STOP, save_at=(STOP,))
    torch.testing.assert_close(torch.tensor(saved["losses"]),
                               torch.tensor(reference["losses"][:STOP]), rtol=LOSS_RTOL, atol=0)
    checkpoint = step_dir(tmp_path / "saved", STOP)
    assert is_complete(checkpoint) and read_info(checkpoint)["layout"]["dp_shard"] == 2
    resumed = train_and_record(_config(tmp_path, "resumed", f"trainer.resume={checkpoint}"),
                               tmp_path / "resumed", STEPS - STOP, 1)
    assert resumed["start_step"] == STOP
    _assert_matches(resumed, reference, start=STOP)


@pytest.mark.parametrize("overrides,world_size,message", [
    (["parallel.ep=2", "parallel.dp_shard=2", "model.moe.num_experts=0"], 2,
     "parallel.ep=2 shards experts, but the model has none"),
    (["parallel.ep=2", "parallel.dp_shard=4"], 4, r"must equal parallel.dp_shard x cp = 4"),
    (["parallel.ep=2", "parallel.dp_shard=2", "parallel.dp_replicate=2"], 4,
     "parallel.dp_replicate=1"),
    (["parallel.ep=3", "parallel.dp_shard=3"], 3, "does not divide model.moe.num_experts=4"),
    (["parallel.ep=0"], 1, "parallel.ep=0 must be at least 1"),
])
def test_bad_expert_parallel_layouts_name_the_setting(
    tmp_path: Path, overrides: list[str], world_size: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(_config(tmp_path, "bad", *overrides), world_size)
