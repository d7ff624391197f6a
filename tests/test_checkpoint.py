"""Checkpoints in one process: exact resume, atomic saves, pruning, weights-only starts and
the safety checks (see core/checkpoint/). Layout changes are in test_checkpoint_parallel.py."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from micro_runs import cut_and_resume, micro_config, synthetic_data
from run_metrics import logged_losses
from scaleforge.core.checkpoint.paths import COMPLETE, complete_checkpoints, latest_checkpoint
from scaleforge.core.checkpoint.safe_load import read_metadata
from scaleforge.core.checkpoint.weights import load_model_checkpoint, save_model_checkpoint
from scaleforge.core.trainer import Trainer
from scaleforge.errors import ConfigError

# 2 micro-batches per step (gradient accumulation), 8 steps.
ACCUMULATE = ("trainer.global_batch_tokens=512", "trainer.micro_batch_size=4")


def train(run_dir: Path, *overrides: str) -> Trainer:
    cfg = micro_config(run_dir, "trainer.max_steps=8", *ACCUMULATE, *overrides)
    trainer = Trainer(cfg, run_dir, data=synthetic_data(cfg, num_windows=20))
    trainer.fit()
    return trainer


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model_parts[0].state_dict().items()}


# Per-document attention: the document ids come from the tokens, so resuming needs nothing
# more from the checkpoint.
DOCUMENTS = ("data.document_masking=true", "model.rope_per_document=true")


@pytest.mark.parametrize("documents", [(), DOCUMENTS], ids=["plain", "document_masking"])
def test_resume_continues_bitwise_with_accumulation_and_an_epoch_boundary(tmp_path, documents):
    # 20 samples per epoch in micro-batches of 4: epochs end in the middle of steps 3, 5
    # and 8, so the resumed part crosses epoch boundaries.
    full = train(tmp_path / "full", "checkpoint.every=0", *documents)
    cut = tmp_path / "cut"
    train(cut, "checkpoint.every=3", *documents)
    assert [s for s, _ in complete_checkpoints(cut)] == [3, 6, 8]
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(cut / "checkpoints" / "step_3", resumed_dir / "checkpoints" / "step_3")
    resumed = train(resumed_dir, "checkpoint.every=0", *documents)  # resume=auto by default
    assert resumed.resumed_from.name == "step_3"
    reference = logged_losses(tmp_path / "full")
    after = logged_losses(resumed_dir)
    assert sorted(after) == [4, 5, 6, 7, 8]
    assert all(after[s] == reference[s] for s in after), (after, reference)
    for name, value in weights(full).items():
        assert torch.equal(value, weights(resumed)[name]), name
    # the loss-spike detector's statistics carried over too (it flags the same steps)
    assert resumed.spike_detector.state_dict() == full.spike_detector.state_dict()
    assert resumed.spike_detector.seen == 8


def test_resume_at_the_end_of_an_epoch_is_exact(tmp_path):
    # 16 training samples = 4 micro-steps of 4 = 2 optimizer steps per epoch:
    # the checkpoint at step 2 sits exactly on the epoch boundary.
    def run(run_dir, *overrides):
        cfg = micro_config(run_dir, "trainer.max_steps=6", *ACCUMULATE, *overrides)
        data = synthetic_data(cfg, num_windows=16)
        assert len(data[0].samples) == 16
        trainer = Trainer(cfg, run_dir, data=data)
        trainer.fit()
        return trainer

    cut_and_resume(run, tmp_path, 2)
    resumed = tmp_path / "resumed"
    reference, after = logged_losses(tmp_path / "full"), logged_losses(resumed)
    assert sorted(after) == [3, 4, 5, 6]
    assert all(after[s] == reference[s] for s in after)


def test_keep_prunes_old_checkpoints_and_resume_never_starts_afresh(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "checkpoint.every=2", "checkpoint.keep=2")
    assert [s for s, _ in complete_checkpoints(run_dir)] == [6, 8]
    info = json.loads((run_dir / "checkpoints/step_8" / COMPLETE).read_text())
    assert info["step"] == 8 and info["tokens"] == 8 * 512 and info["layout"]["tp"] == 1
    assert (run_dir / "checkpoints/step_8/config.yaml").is_file()
    again = train(run_dir, "trainer.resume=never", "trainer.max_steps=2", "checkpoint.keep=0")
    assert again.resumed_from is None and again.step == 2


@pytest.mark.parametrize("moment", ["mid_write", "before_marker"])
def test_a_save_killed_midway_leaves_the_previous_checkpoint_newest(tmp_path, moment):
    """The process dies (os._exit) during step 4's save: in the middle of writing its tensors
    (no .metadata yet), or after every shard but before the marker. Either way the partial
    directory is ignored, resume=auto picks step 2 and the next save removes it."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch.distributed.checkpoint.filesystem as filesystem
        import scaleforge.core.checkpoint.atomic_write as checkpoint
        from scaleforge.core.trainer import Trainer
        from micro_runs import micro_config, synthetic_data
        real_save, real_write, saves, items = checkpoint.dcp.save, filesystem._write_item, [], []
        def counting_save(*args, **kwargs):
            saves.append(1)
            real_save(*args, **kwargs)
            if {moment!r} == "before_marker" and len(saves) == 2:
                os._exit(9)
        def dying_write(*args, **kwargs):
            if {moment!r} == "mid_write" and len(saves) == 2:
                items.append(1)
                if len(items) == 3:
                    os._exit(9)
            return real_write(*args, **kwargs)
        checkpoint.dcp.save, filesystem._write_item = counting_save, dying_write
        cfg = micro_config({str(run_dir)!r}, "trainer.max_steps=8", "checkpoint.every=2",
                           *{ACCUMULATE!r})
        Trainer(cfg, cfg.run_dir, data=synthetic_data(cfg, num_windows=20)).fit()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr[-2000:]
    root = run_dir / "checkpoints"
    has_metadata = (root / ".step_4.partial" / ".metadata").is_file()
    assert has_metadata == (moment == "before_marker")
    assert any((root / ".step_4.partial").iterdir())  # something was written
    assert not (root / ".step_4.partial" / COMPLETE).exists()
    assert latest_checkpoint(run_dir).name == "step_2"

    resumed = train(run_dir, "checkpoint.every=2")
    assert resumed.resumed_from.name == "step_2"
    assert not (root / ".step_4.partial").exists()
    full = tmp_path / "full"
    train(full)
    assert all(logged_losses(run_dir)[s] == logged_losses(full)[s] for s in range(3, 9))


def test_async_save_gives_the_same_checkpoint_as_a_sync_one(tmp_path):
    train(tmp_path / "sync", "checkpoint.every=4")
    train(tmp_path / "async", "checkpoint.every=4", "checkpoint.async_save=true")
    for step in (4, 8):
        a = load_model_checkpoint(tmp_path / f"sync/checkpoints/step_{step}")[1]
        b = load_model_checkpoint(tmp_path / f"async/checkpoints/step_{step}")[1]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_loads_weights_only_and_starts_at_step_zero(tmp_path):
    source = train(tmp_path / "source")
    cfg, state = load_model_checkpoint(tmp_path / "source")  # a run dir: its newest
    assert cfg.model.d_model == source.cfg.model.d_model
    exported = save_model_checkpoint(state, cfg, tmp_path / "exported")
    assert json.loads((exported / COMPLETE).read_text())["model_only"]

    cfg = micro_config(tmp_path / "new", *ACCUMULATE, f"trainer.init_from={exported}")
    trainer = Trainer(cfg, tmp_path / "new", data=synthetic_data(cfg, num_windows=20))
    assert trainer.step == 0 and trainer.initialised_from == exported
    assert not trainer.optimizer.state
    for name, value in weights(source).items():
        assert torch.equal(trainer.model_parts[0].state_dict()[name], value), name

    cfg = micro_config(tmp_path / "new2", *ACCUMULATE, f"trainer.resume={exported}")
    with pytest.raises(ConfigError, match="model weights only.*trainer.init_from"):
        Trainer(cfg, tmp_path / "new2", data=synthetic_data(cfg, num_windows=20))

    # same shapes, different model: an untied checkpoint into a tied model is refused
    cfg = micro_config(
        tmp_path / "tied", f"trainer.init_from={exported}", "model.tie_embeddings=true"
    )
    with pytest.raises(ConfigError, match="tie_embeddings=False.*set model.tie_embeddings"):
        Trainer(cfg, tmp_path / "tied", data=synthetic_data(cfg))


def test_a_checkpoint_of_another_shape_names_the_tensor_and_both_shapes(tmp_path):
    train(tmp_path / "small", "trainer.max_steps=2")
    cfg = micro_config(
        tmp_path / "wide",
        *ACCUMULATE,
        "model.d_model=96",
        "model.n_heads=4",
        f"trainer.resume={tmp_path / 'small'}",
    )
    shapes = r"tok_embeddings.weight has shape \(512, 64\).*expects \(512, 96\)"
    with pytest.raises(ConfigError, match=shapes):
        Trainer(cfg, tmp_path / "wide", data=synthetic_data(cfg))


def test_bad_resume_paths_are_named(tmp_path):
    cfg = micro_config(tmp_path / "a", f"trainer.resume={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="trainer.resume=.*nowhere.*no complete checkpoint"):
        Trainer(cfg, tmp_path / "a", data=synthetic_data(cfg))
    partial = tmp_path / "run" / "checkpoints" / "step_3"
    partial.mkdir(parents=True)
    cfg = micro_config(tmp_path / "b", f"trainer.resume={partial}")
    with pytest.raises(ConfigError, match="incomplete"):
        Trainer(cfg, tmp_path / "b", data=synthetic_data(cfg))


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path):
    train(tmp_path / "run", "trainer.max_steps=2")
    path = tmp_path / "run" / "checkpoints" / "step_2"
    assert read_metadata(path).state_dict_metadata  # the real metadata reads fine

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        read_metadata(path)
    assert not (tmp_path / "pwned").exists()


def test_a_tied_embedding_is_stored_once_and_resumes_into_both(tmp_path):
    tied = "model.tie_embeddings=true"
    full, resumed = cut_and_resume(train, tmp_path, 4, tied)
    saved = read_metadata(tmp_path / "cut/checkpoints/step_4").state_dict_metadata
    assert "model.tok_embeddings.weight" in saved and "model.output.weight" not in saved
    resumed_dir = tmp_path / "resumed"
    assert resumed.model_parts[0].output.weight is resumed.model_parts[0].tok_embeddings.weight
    assert all(
        logged_losses(resumed_dir)[s] == logged_losses(tmp_path / "full")[s] for s in range(5, 9)
    )
    for name, value in weights(full).items():
        assert torch.equal(value, weights(resumed)[name]), name


def test_resumed_run_truncates_metrics_and_records_its_console(tmp_path, capsys):
    """A run restarted from step 4 of 8 keeps one record per step in metrics.jsonl (the
    records the first start logged after step 4 are dropped), says which setting changed
    since the checkpoint, and train.log holds the console lines of both starts, each
    checkpoint save included."""
    run_dir = tmp_path / "run"
    train(run_dir, "checkpoint.every=2", "trainer.log_every=1")
    for step in (6, 8):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step}")
    resumed = train(run_dir, "checkpoint.every=2", "trainer.log_every=1",
                    "trainer.spike_zscore=5.0")
    assert resumed.resumed_from.name == "step_4"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == list(range(9))
    console = capsys.readouterr().out
    assert "metrics.jsonl: dropped 4 records after step 4" in console
    assert "config changed since the checkpoint: trainer.spike_zscore 6.0 -> 5.0\n" in console
    log = (run_dir / "train.log").read_text()
    assert f"checkpoint: {run_dir / 'checkpoints' / 'step_2'}" in log
    lines = log.splitlines()  # a save's line follows its step's line
    assert (lines.index(f"checkpoint: {run_dir / 'checkpoints' / 'step_2'}")
            == next(i for i, line in enumerate(lines) if line.startswith("step      2")) + 1)
    assert log.count(f"checkpoint: {run_dir / 'checkpoints' / 'step_6'}") == 2
    assert "metrics.jsonl: dropped 4 records" in log and log.count("step      8 |") == 2
