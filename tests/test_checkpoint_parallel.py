"""Checkpoints across processes: resharding between layouts, exact resume, async save.

The runs train llama_micro (one: a GPT of the same size) in fp32 on the harness's synthetic
data, in real gloo processes with one thread per rank (one test: the real stdlib corpus in
one process), so a resumed run can be compared with the uninterrupted run of the same model
and data: across layouts within the tolerances of test_parallel_layouts.py, in the same
layout bitwise. 4-process runs are marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layout_runs import (
    COMMON,
    GPT_MICRO,
    LOSS_RTOL,
    PIPELINE_MODEL,
    assert_weights_match,
    fit_layout,
    run_layout,
    train_and_record,
    weights_against_bounds,
)
from micro_runs import micro_config, synthetic_data
from run_metrics import logged_losses
from scaleforge.core.checkpoint.paths import complete_checkpoints, is_complete, read_info, step_dir
from scaleforge.core.config import Config, micro_batches_per_step
from scaleforge.core.trainer import Trainer

STEPS = 5
STOP = 2  # resharding tests save after 2 steps and continue for 3


def _config(tmp_path: Path, name: str, *overrides: str) -> Config:
    """micro_config with the layout tests' batch and clipping, run dir tmp_path/name."""
    return micro_config(tmp_path / name, *COMMON, *overrides)


def _run(cfg: Config, world_size: int, steps: int, save_at: tuple[int, ...] = ()) -> dict:
    """train_and_record in this process (world size 1) or in spawned ranks."""
    if world_size == 1:
        return train_and_record(cfg, Path(cfg.run_dir), steps, 1, save_at=save_at)
    return run_layout(cfg, world_size, steps, save_at=save_at)


def _relative_loss_difference(losses: list[float], expected: list[float]) -> float:
    got, want = torch.tensor(losses), torch.tensor(expected)
    return ((got - want).abs() / want.abs()).max().item()


def _assert_continues(resumed: dict, reference: dict, stop: int) -> float:
    """`resumed` started at step `stop` and trained like the rest of `reference`: losses
    within LOSS_RTOL, final weights within their Adam bounds over the reference's steps
    (layout_runs.assert_weights_match: the saving run's steps differ by rounding as the
    resumed run's do). Returns the largest relative loss difference."""
    assert resumed["start_step"] == stop
    torch.testing.assert_close(torch.tensor(resumed["losses"]),
                               torch.tensor(reference["losses"][stop:]), rtol=LOSS_RTOL, atol=0)
    assert_weights_match(resumed["final"], reference)
    worst_weight = max((resumed["final"][k] - v).abs().max().item()
                       for k, v in reference["final"].items())
    worst_loss = _relative_loss_difference(resumed["losses"], reference["losses"][stop:])
    print(f"resumed at step {stop}: max relative loss difference {worst_loss:.2e}, max weight "
          f"difference {worst_weight:.2e}")
    return worst_loss


def _saved_checkpoint(run_dir: Path, step: int, layout: dict[str, int]) -> Path:
    """The complete checkpoint of `step` in `run_dir`, checked to have been saved under
    `layout` (the parallel sizes given; the others 1)."""
    path = step_dir(run_dir, step)
    assert is_complete(path), path
    saved_layout = read_info(path)["layout"]
    assert saved_layout == {"tp": 1, "pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1,
                            **layout}
    return path


def test_dp_shard2_checkpoint_resumes_in_one_process_with_its_optimizer_state(tmp_path):
    reference = _run(_config(tmp_path, "reference"), 1, STEPS)
    saved = _run(_config(tmp_path, "saved", "parallel.dp_shard=2"), 2, STOP,
                 save_at=(STOP,))
    torch.testing.assert_close(torch.tensor(saved["losses"]),
                               torch.tensor(reference["losses"][:STOP]), rtol=LOSS_RTOL, atol=0)
    checkpoint = _saved_checkpoint(tmp_path / "saved", STOP, {"dp_shard": 2})

    resume = f"trainer.resume={checkpoint}"
    resumed = _run(_config(tmp_path, "resumed", resume), 1, STEPS - STOP)
    worst = _assert_continues(resumed, reference, STOP)

    # Control: the same reload without AdamW's moments and step count visibly diverges, so
    # the comparison above would catch optimizer state lost in resharding.
    control = train_and_record(_config(tmp_path, "control", resume), tmp_path / "control",
                               STEPS - STOP, 1, forget_optimizer_state=True)
    loss_without = _relative_loss_difference(control["losses"], reference["losses"][STOP:])
    weight_without, where = weights_against_bounds(control["final"], reference)
    print(f"dp_shard2 -> 1: {worst:.2e}; without optimizer state: loss {loss_without:.2e}, "
          f"weights up to {weight_without:.1f} times their Adam bound ({where})")
    # _assert_continues checks both, so one clear miss is enough to catch lost state (after
    # one or two steps the moments move the weights more visibly than the loss).
    assert loss_without > 10 * LOSS_RTOL or weight_without > 10


def test_cp2_checkpoint_resumes_in_one_process_with_single_process_losses(tmp_path):
    reference = _run(_config(tmp_path, "reference"), 1, STEPS)
    saved = _run(_config(tmp_path, "saved", "parallel.cp=2"), 2, STOP, save_at=(STOP,))
    torch.testing.assert_close(torch.tensor(saved["losses"]),
                               torch.tensor(reference["losses"][:STOP]), rtol=LOSS_RTOL, atol=0)
    checkpoint = _saved_checkpoint(tmp_path / "saved", STOP, {"cp": 2})
    resumed = _run(_config(tmp_path, "resumed", f"trainer.resume={checkpoint}"), 1,
                   STEPS - STOP)
    worst = _assert_continues(resumed, reference, STOP)
    print(f"cp2 -> 1: max relative loss difference {worst:.2e}")


# name: (model overrides, saving layout overrides, its world size, its layout as in
# complete.json, resuming layout overrides, its world size, the resumed parameters' mesh)
RESHARDS = {
    "1_to_tp2_dp_shard2": ([], [], 1, {}, ["parallel.tp=2", "parallel.dp_shard=2"], 4, (2, 2)),
    "tp2_pp2_to_1": (PIPELINE_MODEL, ["parallel.tp=2", "parallel.pp=2"], 4,
                     {"tp": 2, "pp": 2}, [], 1, None),
    "dp_shard4_to_pp2_dp_shard2": (PIPELINE_MODEL, ["parallel.dp_shard=4"], 4,
                                   {"dp_shard": 4}, ["parallel.pp=2", "parallel.dp_shard=2"],
                                   4, (2,)),
    # Tied embedding (one parameter, two state-dict keys), biases and position embeddings.
    "gpt_tp2_to_1": (GPT_MICRO, ["parallel.tp=2"], 2, {"tp": 2}, [], 1, None),
    # Qwen's and Llama 3.1's options: q/k/v biases (sharded), q/k norms (replicated), wider
    # heads, a sliding window, llama3 RoPE scaling.
    "qwen_options_tp2_to_1": (["model.qkv_bias=true", "model.qk_norm=true", "model.head_dim=24",
                               "model.sliding_window=16", "model.rope_scaling.type=llama3",
                               "model.rope_scaling.original_max_position_embeddings=16"],
                              ["parallel.tp=2"], 2, {"tp": 2}, [], 1, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESHARDS))
def test_checkpoint_resharded_to_another_layout_trains_like_one_process(tmp_path, name):
    model, saving, saving_world, saved_layout, resuming, resuming_world, mesh = RESHARDS[name]
    reference = _run(_config(tmp_path, "reference", *model), 1, STEPS)
    saved = _run(_config(tmp_path, "saved", *model, *saving), saving_world, STOP,
                 save_at=(STOP,))
    torch.testing.assert_close(torch.tensor(saved["losses"]),
                               torch.tensor(reference["losses"][:STOP]), rtol=LOSS_RTOL, atol=0)
    checkpoint = _saved_checkpoint(tmp_path / "saved", STOP, saved_layout)
    resumed = _run(_config(tmp_path, "resumed", *model, *resuming,
                           f"trainer.resume={checkpoint}"),
                   resuming_world, STEPS - STOP)
    if mesh is not None:  # the resumed run really ran sharded
        assert resumed["placements"]
        assert {shape for shape, _ in resumed["placements"].values()} == {mesh}
    worst = _assert_continues(resumed, reference, STOP)
    print(f"{name}: max relative loss difference {worst:.2e}")


def test_dp_shard2_resumes_bitwise_mid_epoch_and_on_an_epoch_boundary(tmp_path):
    cfg = _config(tmp_path, "uninterrupted", "parallel.dp_shard=2")
    micro_batches = micro_batches_per_step(cfg, dp_size=2)
    assert micro_batches > 1  # gradient accumulation
    train, _ = synthetic_data(cfg, dp_rank=0, dp_size=2)
    samples_per_step = 2 * cfg.trainer.micro_batch_size * micro_batches
    assert len(train.samples) % samples_per_step == 0
    epoch_steps = len(train.samples) // samples_per_step
    stops = (3, epoch_steps)
    total = epoch_steps + 2
    overrides = ["parallel.dp_shard=2", f"trainer.max_steps={total}", "checkpoint.keep=0"]

    uninterrupted = run_layout(_config(tmp_path, "uninterrupted", *overrides), 2, total)
    saved = run_layout(_config(tmp_path, "saved", *overrides), 2, epoch_steps, save_at=stops)
    assert saved["losses"] == uninterrupted["losses"][:epoch_steps]  # saving changes nothing
    for stop in stops:
        checkpoint = _saved_checkpoint(tmp_path / "saved", stop, {"dp_shard": 2})
        resumed = run_layout(_config(tmp_path, f"resumed{stop}", *overrides,
                                     f"trainer.resume={checkpoint}"), 2, total - stop)
        assert resumed["start_step"] == stop
        assert resumed["losses"] == uninterrupted["losses"][stop:], stop
        for name, tensor in uninterrupted["final"].items():
            assert torch.equal(resumed["final"][name], tensor), (stop, name)


def test_resume_with_other_loader_workers_continues_bitwise(tmp_path, stdlib_overrides):
    # The real corpus through the Trainer's own loaders and fit(): it saves at step 3 and
    # goes on to 6; a fresh run resumes from step 3 with two loader worker processes.
    common = [*stdlib_overrides, "trainer.max_steps=6", "checkpoint.keep=0"]
    first = micro_config(tmp_path / "first", *common, "checkpoint.every=3",
                         "data.num_workers=0")
    Trainer(first, tmp_path / "first").fit()
    checkpoint = _saved_checkpoint(tmp_path / "first", 3, {})
    second = micro_config(tmp_path / "second", *common, "data.num_workers=2",
                          f"trainer.resume={checkpoint}")
    resuming = Trainer(second, tmp_path / "second")
    assert resuming.train_batches.num_workers == 2 and resuming.step == 3
    resuming.fit()
    uninterrupted = logged_losses(tmp_path / "first")
    resumed = logged_losses(tmp_path / "second")
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {step: uninterrupted[step] for step in (4, 5, 6)}


def test_async_checkpoint_resumes_like_a_sync_one_in_one_process(tmp_path):
    # Each run saves at STOP and trains on while an async write may still be in flight, so a
    # checkpoint that was not a copy of the state at STOP would resume differently.
    reference = _run(_config(tmp_path, "reference"), 1, STEPS)
    resumed = {}
    for mode in ("sync", "async"):
        async_save = f"checkpoint.async_save={mode == 'async'}"
        saved = _run(_config(tmp_path, f"saved_{mode}", async_save), 1, STEPS, save_at=(STOP,))
        assert saved["losses"] == reference["losses"]
        checkpoint = _saved_checkpoint(tmp_path / f"saved_{mode}", STOP, {})
        resumed[mode] = _run(_config(tmp_path, f"resumed_{mode}", f"trainer.resume={checkpoint}"),
                             1, STEPS - STOP)
        assert resumed[mode]["losses"] == reference["losses"][STOP:], mode
    for name, tensor in resumed["sync"]["final"].items():
        assert torch.equal(resumed["async"]["final"][name], tensor), name
        assert torch.equal(reference["final"][name], tensor), name


def test_fit_with_async_checkpoints_under_dp_shard2_resumes_bitwise(tmp_path):
    # fit() saves every 2 steps in the background and renames each checkpoint when rank 0
    # finds its write done (poll), while the ranks train on; a fresh set of processes
    # resumes the run's step-4 checkpoint and logs the same last two losses.
    overrides = ["parallel.dp_shard=2", "checkpoint.async_save=true", "checkpoint.every=2",
                 "checkpoint.keep=0", "trainer.max_steps=6"]
    fit_layout(_config(tmp_path, "first", *overrides), 2)
    assert [step for step, _ in complete_checkpoints(tmp_path / "first")] == [2, 4, 6]
    checkpoint = _saved_checkpoint(tmp_path / "first", 4, {"dp_shard": 2})
    fit_layout(_config(tmp_path, "second", *overrides, f"trainer.resume={checkpoint}"), 2)
    uninterrupted = logged_losses(tmp_path / "first")
    resumed = logged_losses(tmp_path / "second")
    assert sorted(resumed) == [5, 6]
    assert resumed == {step: uninterrupted[step] for step in (5, 6)}


def test_async_checkpoint_of_dp_shard2_resumes_bitwise(tmp_path):
    # The saving run trains on while the write is in flight; it must still train like one
    # process, and the resumed run must repeat its last steps exactly.
    reference = _run(_config(tmp_path, "reference"), 1, STEPS)
    overrides = ["parallel.dp_shard=2", "checkpoint.async_save=true"]
    saved = run_layout(_config(tmp_path, "saved", *overrides), 2, STEPS, save_at=(STOP,))
    torch.testing.assert_close(torch.tensor(saved["losses"]), torch.tensor(reference["losses"]),
                               rtol=LOSS_RTOL, atol=0)
    checkpoint = _saved_checkpoint(tmp_path / "saved", STOP, {"dp_shard": 2})
    resumed = run_layout(_config(tmp_path, "resumed", *overrides, f"trainer.resume={checkpoint}"),
                         2, STEPS - STOP)
    assert resumed["losses"] == saved["losses"][STOP:]
    for name, tensor in saved["final"].items():
        assert torch.equal(resumed["final"][name], tensor), name
