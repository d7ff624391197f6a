"""Expert parallelism (parallel/expert_parallel.py) in real gloo processes against the
single-process MoE run of the same model and data: per-step losses, grad norms, MoE metrics
(aux loss, expert load per layer) and final weights (experts, router, expert bias included)
within the layout tests' fp32 tolerances; ep borrowed from dp_shard x cp with FSDP over the
rest (efsdp), HSDP replicas and context parallelism; expert tensor parallelism (etp = tp,
with and without ep; etp 1 under tp alone); ep and etp checkpoints resumed in one process
(ep1); the layout's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layout_runs import (
    COMMON,
    LOSS_RTOL,
    PIPELINE_MODEL,
    assert_weights_match,
    run_layout,
    train_and_record,
)
from micro_runs import micro_config
from scaleforge.core.checkpoint.paths import is_complete, read_info, step_dir
from scaleforge.core.config import Config, validate
from scaleforge.errors import ConfigError
from scaleforge.models.init import canonical_name
from scaleforge.parallel.config import ParallelConfig
from scaleforge.parallel.run_setup import init_topology
from scaleforge.parallel.topology import ParallelDims
from scaleforge.planner.search import Layout, layout_config
from scaleforge.planner.shards import ShardProbe, fake_world

STEPS, STOP = 4, 2
# llama_micro with 4 experts of width 32, top 2, in both layers; both balancing mechanisms.
MOE = ["model.moe.num_experts=4", "model.moe.expert_hidden=32", "model.moe.aux_loss_coef=0.01",
       "model.moe.bias_update_rate=0.01"]
EXPERT = "layers.0.feed_forward.experts.w1"
# The experts' placements on the (efsdp, ep) mesh with ep = dp_shard 2: FSDP's efsdp of one.
EP2_ALONE = ((1, 2), "(_StridedShard(dim=0, sf=2), Shard(dim=0))")


def _placements(result: dict) -> dict:
    """name (without module wrappers' prefixes) -> (mesh shape, placements)."""
    return {canonical_name(name): value for name, value in result["placements"].items()}


def _config(tmp_path: Path, name: str, *overrides: str) -> Config:
    return micro_config(tmp_path / name, *COMMON, *MOE, *overrides)


def _reference(tmp_path: Path, *overrides: str) -> dict:
    return train_and_record(_config(tmp_path, "reference", *overrides), tmp_path / "reference",
                            STEPS, 1)


def _assert_matches(result: dict, reference: dict, start: int = 0) -> None:
    """Losses and grad norms within LOSS_RTOL from step `start` of the reference on, final
    weights within their Adam bounds and buffers within WEIGHT_RTOL/ATOL
    (layout_runs.assert_weights_match)."""
    torch.testing.assert_close(torch.tensor(result["losses"]),
                               torch.tensor(reference["losses"][start:]), rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(result["grad_norms"]),
                               torch.tensor(reference["grad_norms"][start:]), rtol=LOSS_RTOL,
                               atol=0)
    for got, want in zip(result["moe_metrics"], reference["moe_metrics"][start:], strict=True):
        assert got.keys() == want.keys() and "aux_loss" in got and "expert_load.1" in got
        torch.testing.assert_close(got, want, rtol=LOSS_RTOL, atol=0)
    assert result["final"].keys() == reference["final"].keys()
    assert "layers.1.feed_forward.expert_bias" in result["final"]
    assert_weights_match(result["final"], reference)


@pytest.mark.parametrize("extra", [[], ["trainer.activation_checkpointing=full"]],
                         ids=["ep2", "ep2_full_ac"])
def test_ep2_matches_single_process_in_fp32(tmp_path: Path, extra: list[str]) -> None:
    reference = _reference(tmp_path)
    result = run_layout(_config(tmp_path, "ep2", "parallel.dp_shard=2", "parallel.ep=2",
                                *extra), 2, STEPS)
    assert _placements(result)[EXPERT] == EP2_ALONE  # two experts each
    _assert_matches(result, reference)


@pytest.mark.slow
def test_ep2_tp2_matches_single_process_in_fp32(tmp_path: Path) -> None:
    reference = _reference(tmp_path)
    result = run_layout(_config(tmp_path, "ep2_tp2", "parallel.dp_shard=2", "parallel.ep=2",
                                "parallel.tp=2"), 4, STEPS)
    assert _placements(result)[EXPERT] == EP2_ALONE
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


@pytest.mark.parametrize("sizes,ep,groups", [
    ({"dp_shard": 4}, 2, {"ep": [0, 1], "efsdp": [0, 2]}),
    # cp inner: the ep pair is a cp pair; tp innermost of all
    ({"dp_shard": 2, "cp": 2, "tp": 2}, 2, {"ep": [0, 2], "efsdp": [0, 4], "tp": [0, 1]}),
    ({"dp_shard": 2, "cp": 2}, 4, {"ep": [0, 1, 2, 3], "efsdp": [0]}),
    ({"dp_replicate": 2, "dp_shard": 2}, 2, {"ep": [0, 1], "efsdp": [0], "dp_replicate": [0, 2]}),
    ({"cp": 4}, 2, {"ep": [0, 1], "efsdp": [0, 2]}),  # ep within the cp group
], ids=["dp_shard4_ep2", "dp_shard2_cp2_tp2_ep2", "dp_shard2_cp2_ep4", "hsdp_ep2", "cp4_ep2"])
def test_expert_mesh_cuts_dp_shard_x_cp_into_efsdp_x_ep(sizes: dict, ep: int,
                                                       groups: dict) -> None:
    """Rank 0's groups on the expert mesh, built by torch's fake process group."""
    dims = ParallelDims(**{"tp": 1, "pp": 1, "dp_replicate": 1, "dp_shard": 1} | sizes)
    with fake_world(dims.world_size):
        topology = init_topology(ParallelConfig(ep=ep, **sizes), dims, "cpu")
        for name, ranks in groups.items():
            assert topology.expert_submesh(name).mesh.flatten().tolist() == ranks, name


TWO_EXPERTS = ["model.moe.num_experts=2", "model.moe.top_k=1"]
# ep borrowed from dp_shard x cp: overrides, processes, the experts' (mesh shape, placements)
# on the expert mesh (dp_replicate under HSDP, efsdp, ep).
BORROWED = {
    "ep2_dp_shard4": (["parallel.dp_shard=4", "parallel.ep=2"], 4,
                      ((2, 2), "(_StridedShard(dim=0, sf=2), Shard(dim=0))")),
    "ep2_dp_replicate2_dp_shard2": (
        ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2"], 4,
        ((2, 1, 2), "(Replicate(), _StridedShard(dim=0, sf=2), Shard(dim=0))")),
    "ep2_cp2": (["parallel.cp=2", "parallel.ep=2"], 2, EP2_ALONE),
    # One expert per ep rank, efsdp 2: FSDP splits each expert's rows (dim 1) instead.
    "ep2_dp_shard4_2_experts": (["parallel.dp_shard=4", "parallel.ep=2", *TWO_EXPERTS], 4,
                                ((2, 2), "(Shard(dim=1), Shard(dim=0))")),
    # No ep: the experts are FSDP-sharded over dp_shard x cp like any weight.
    "cp2": (["parallel.cp=2"], 2, ((2,), "(Shard(dim=0),)")),
}


@pytest.mark.parametrize("name", [
    "ep2_dp_shard4", "ep2_cp2", "cp2", "ep2_dp_shard4_2_experts",
    # 10 s alone, 21 s on a loaded machine
    pytest.param("ep2_dp_replicate2_dp_shard2", marks=pytest.mark.slow),
])
def test_ep_borrowed_from_dp_shard_x_cp_matches_single_process_in_fp32(tmp_path: Path,
                                                                        name: str) -> None:
    """Experts FSDP-sharded over efsdp and averaged over replicas, or routed per cp chunk:
    the aux loss's fractions and the load counts cover the whole sequences."""
    overrides, world_size, placements = BORROWED[name]
    reference = _reference(tmp_path, *(TWO_EXPERTS if "2_experts" in name else []))
    result = run_layout(_config(tmp_path, name, *overrides), world_size, STEPS)
    assert _placements(result)[EXPERT] == placements
    _assert_matches(result, reference)


@pytest.mark.parametrize("layout,world_size,model", [
    (["parallel.dp_shard=2", "parallel.ep=2"], 2, []),
    (["parallel.dp_shard=4", "parallel.ep=2"], 4, []),
    (["parallel.dp_shard=4", "parallel.ep=2"], 4, TWO_EXPERTS),  # experts' rows FSDP-sharded
], ids=["ep2", "ep2_dp_shard4", "ep2_dp_shard4_2_experts"])
def test_ep_checkpoint_resumes_under_ep1(tmp_path: Path, layout: list[str], world_size: int,
                                         model: list[str]) -> None:
    reference = _reference(tmp_path, *model)
    saved = run_layout(_config(tmp_path, "saved", *model, *layout), world_size, STOP,
                       save_at=(STOP,))
    torch.testing.assert_close(torch.tensor(saved["losses"]),
                               torch.tensor(reference["losses"][:STOP]), rtol=LOSS_RTOL, atol=0)
    checkpoint = step_dir(tmp_path / "saved", STOP)
    assert is_complete(checkpoint)
    assert read_info(checkpoint)["layout"]["dp_shard"] == world_size
    resumed = train_and_record(_config(tmp_path, "resumed", *model,
                                       f"trainer.resume={checkpoint}"),
                               tmp_path / "resumed", STEPS - STOP, 1)
    assert resumed["start_step"] == STOP
    _assert_matches(resumed, reference, start=STOP)


# Expert tensor parallelism: one shared expert too, so its split is checked as well.
SHARED = ["model.moe.shared_experts=1"]
ETP2 = ["parallel.tp=2", "parallel.etp=2"]
SHARED_W2 = "layers.0.feed_forward.shared.w2.weight"


@pytest.mark.parametrize("etp,placements", [
    (1, ("(Replicate(),)", "(Replicate(),)", "(Replicate(),)")),
    # w1 by columns of each expert, w2 by rows; the shared experts' w2 by rows
    (2, ("(Shard(dim=1),)", "(Shard(dim=2),)", "(Shard(dim=1),)")),
], ids=["etp1", "etp2"])
def test_tp2_moe_matches_single_process_in_fp32(tmp_path: Path, etp: int,
                                                placements: tuple[str, ...]) -> None:
    """etp 1: experts whole on every tp rank, replicated like the router. etp 2: experts and
    shared experts split by width over tp, the router's and the input's partial gradients
    summed over tp, the auxiliary loss's gradient counted once."""
    reference = _reference(tmp_path, *SHARED)
    result = run_layout(_config(tmp_path, f"tp2_etp{etp}", *SHARED, "parallel.tp=2",
                                f"parallel.etp={etp}"), 2, STEPS)
    names = (EXPERT, EXPERT.replace("w1", "w2"), SHARED_W2)
    assert tuple(_placements(result)[name] for name in names) == tuple(
        ((2,), placement) for placement in placements)
    _assert_matches(result, reference)


@pytest.mark.slow
def test_ep2_tp2_etp2_matches_single_process_in_fp32(tmp_path: Path) -> None:
    reference = _reference(tmp_path, *SHARED)
    result = run_layout(_config(tmp_path, "ep2_tp2_etp2", *SHARED, *ETP2,
                                "parallel.dp_shard=2", "parallel.ep=2"), 4, STEPS)
    assert _placements(result)[EXPERT] == (
        (1, 2, 2), "(_StridedShard(dim=0, sf=2), Shard(dim=0), Shard(dim=1))")
    _assert_matches(result, reference)


# etp2 with the other axes and MoE options: layout overrides, model overrides, processes.
ETP2_WITH = {
    "full_ac": (["trainer.activation_checkpointing=full"], SHARED, 2),
    "capacity_loop_sigmoid": ([], ["model.moe.capacity_factor=1.0", "model.moe.grouped_mm=loop",
                                   "model.moe.score_func=sigmoid"], 2),
    "dp_shard2": (["parallel.dp_shard=2"], SHARED, 4),
    "cp2": (["parallel.cp=2"], SHARED, 4),
    "pp2": (["parallel.pp=2"], PIPELINE_MODEL, 4),
    # FSDP over efsdp 2 on top of (ep, tp): by expert, or by rows with one expert per ep rank
    "ep2_dp_shard4": (["parallel.dp_shard=4", "parallel.ep=2"], SHARED, 8),
    "ep2_dp_shard4_2_experts": (["parallel.dp_shard=4", "parallel.ep=2"], TWO_EXPERTS, 8),
}


@pytest.mark.parametrize("name", [  # 4 or 8 processes: slow (5-15 s alone, more when loaded)
    pytest.param(name, marks=pytest.mark.slow) if world_size > 2 else name
    for name, (_, _, world_size) in ETP2_WITH.items()
])
def test_tp2_etp2_with_other_axes_matches_single_process_in_fp32(tmp_path: Path,
                                                                 name: str) -> None:
    """Recomputation runs the gathers again; capacity drops, the loop over experts and
    sigmoid scores route alike on every tp rank; FSDP shards the split experts again."""
    layout, model, world_size = ETP2_WITH[name]
    reference = _reference(tmp_path, *model)
    result = run_layout(_config(tmp_path, name, *model, *ETP2, *layout), world_size, STEPS)
    _assert_matches(result, reference)


def test_tp2_etp2_checkpoint_resumes_in_one_process(tmp_path: Path) -> None:
    reference = _reference(tmp_path, *SHARED)
    saved = run_layout(_config(tmp_path, "saved", *SHARED, *ETP2), 2, STOP, save_at=(STOP,))
    torch.testing.assert_close(torch.tensor(saved["losses"]),
                               torch.tensor(reference["losses"][:STOP]), rtol=LOSS_RTOL, atol=0)
    checkpoint = step_dir(tmp_path / "saved", STOP)
    assert read_info(checkpoint)["layout"]["tp"] == 2
    resumed = train_and_record(_config(tmp_path, "resumed", *SHARED,
                                       f"trainer.resume={checkpoint}"),
                               tmp_path / "resumed", STEPS - STOP, 1)
    assert resumed["start_step"] == STOP
    _assert_matches(resumed, reference, start=STOP)


def test_planner_counts_experts_split_by_etp(tmp_path: Path) -> None:
    """sf-plan's shards come from the real sharded model: at tp2 each rank holds half of
    every expert and shared expert under etp=tp, all of them under etp 1; a layout of
    another tp takes etp = its tp."""
    shards = {}
    for etp in (1, 2):
        cfg = _config(tmp_path, f"plan{etp}", *SHARED, f"parallel.etp={etp}")
        with fake_world(2):
            shards[etp] = ShardProbe(cfg).shards(2, 1)
    for name in (EXPERT, SHARED_W2):
        assert shards[2][name].local_elements * 2 == shards[1][name].local_elements, name
    assert layout_config(cfg, Layout(4, 1, 1, 1, None, 1, "none", 1), set()).parallel.etp == 4


@pytest.mark.parametrize("overrides,world_size,message", [
    (["parallel.etp=2"], 1, r"parallel.etp=2 must be 1 or parallel.tp=1"),
    (["parallel.tp=2", "parallel.etp=2", "model.moe.num_experts=0"], 2,
     "parallel.etp=2 splits experts, but the model has none"),
    (["parallel.tp=2", "parallel.etp=2", "model.moe.expert_hidden=33"], 2,
     "model.moe.expert_hidden=33 is not divisible by parallel.tp=2"),
    (["parallel.etp=0"], 1, "parallel.etp=0 must be at least 1"),
    (["parallel.ep=2", "parallel.dp_shard=2", "model.moe.num_experts=0"], 2,
     "parallel.ep=2 shards experts, but the model has none"),
    (["parallel.ep=4", "parallel.dp_shard=2"], 2,
     r"parallel.ep=4 does not divide parallel.dp_shard x cp = 2 x 1 = 2"),
    (["parallel.ep=4", "parallel.dp_shard=3", "parallel.cp=2"], 6,
     r"does not divide parallel.dp_shard x cp = 3 x 2 = 6"),
    (["parallel.cp=2", "model.moe.capacity_factor=1.5"], 2,
     r"model.moe.capacity_factor=1.5 with parallel.cp=2"),
    (["parallel.ep=3", "parallel.dp_shard=3"], 3, "does not divide model.moe.num_experts=4"),
    (["parallel.ep=0"], 1, "parallel.ep=0 must be at least 1"),
])
def test_bad_expert_parallel_layouts_name_the_setting(
    tmp_path: Path, overrides: list[str], world_size: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(_config(tmp_path, "bad", *overrides), world_size)
