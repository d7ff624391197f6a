"""Snapshots staged in host memory and written in the background
(core/checkpoint/snapshot_writer.py): a run resumed from one continues with the
uninterrupted run's losses, and a snapshot torn by a failure (a folder or peer copy still
under its partial name) is never taken. The multi-process kill drills are in
tests/test_faults_at_scale.py."""

from __future__ import annotations

import shutil

import pytest

from micro_runs import micro_config, synthetic_data
from run_metrics import metrics_records
from scaleforge.core.checkpoint.paths import partial_dir, step_dir
from scaleforge.core.checkpoint.snapshots import newest_reachable, peer_dir
from scaleforge.core.trainer import Trainer


def _train(run_dir, snapshots, max_steps: int) -> Trainer:
    cfg = micro_config(run_dir, f"trainer.max_steps={max_steps}", "checkpoint.snapshot_every=2",
                       f"checkpoint.snapshot_dir={snapshots}", "trainer.resume=auto")
    trainer = Trainer(cfg, run_dir, data=synthetic_data(cfg))
    trainer.fit()
    return trainer


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_records(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 6-step run with snapshots every 2 steps: snapshots of steps 2 and 4 (none at the
    last step), each written while the next step trains."""
    root = tmp_path_factory.mktemp("snapshots")
    trainer = _train(root / "run", root / "snap", 6)
    assert trainer.snapshots.writer is not None and not trainer.snapshots.writer.in_flight
    return root, _losses(root / "run")


def test_snapshots_are_renamed_complete_and_copied_to_the_peer(uninterrupted):
    root, _ = uninterrupted
    snapshots = root / "snap"
    assert sorted(p.name for p in (snapshots / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert sorted(p.name for p in peer_dir(snapshots, 0).iterdir()) == ["step_2", "step_4"]
    for name in ("__0_0.distcp", ".metadata", "complete.json", "config.yaml"):
        assert (peer_dir(snapshots, 0) / "step_4" / name).is_file(), name


def test_a_run_resumed_from_a_background_snapshot_repeats_the_uninterrupted_losses(
        uninterrupted, tmp_path):
    root, expected = uninterrupted
    snapshots = tmp_path / "snap"
    shutil.copytree(root / "snap", snapshots)
    resumed = _train(tmp_path / "run", snapshots, 6)
    assert resumed.resumed_from == step_dir(snapshots, 4)
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == [5, 6]
    # bitwise: the state was copied at step 4's end, before step 5 changed the weights
    assert losses == {step: expected[step] for step in (5, 6)}


def test_a_snapshot_torn_by_a_failure_is_never_taken(uninterrupted, tmp_path):
    root, _ = uninterrupted
    snapshots = tmp_path / "snap"
    shutil.copytree(root / "snap", snapshots)
    # step 6's write killed midway: every file in the partial folders, none renamed
    shutil.copytree(step_dir(snapshots, 4), partial_dir(step_dir(snapshots, 6)))
    shutil.copytree(peer_dir(snapshots, 0) / "step_4",
                    partial_dir(peer_dir(snapshots, 0) / "step_6"))
    assert newest_reachable(snapshots, 1) == (4, step_dir(snapshots, 4))
    # step 4's own folder lost: its peer copy, complete, is put back
    shutil.rmtree(step_dir(snapshots, 4))
    assert newest_reachable(snapshots, 1) == (4, step_dir(snapshots, 4))
    assert (step_dir(snapshots, 4) / "__0_0.distcp").is_file()
    assert not list(step_dir(snapshots, 4).glob(".*.partial"))
