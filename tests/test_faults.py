"""Faults: non-finite steps skipped or stopping the run, loss spikes reported, preemption
signals ending a run with a checkpoint at the same step on every rank."""

from __future__ import annotations

import math
import os
import re
import signal
import threading
from pathlib import Path

import pytest
import torch

from distributed import run_distributed_test
from micro_runs import micro_config, synthetic_data
from run_metrics import metrics_records
from scaleforge.core.config import validate
from scaleforge.core.health import LossSpikeDetector
from scaleforge.core.lr_schedule import lr_factor
from scaleforge.core.precision import Precision
from scaleforge.core.preemption import PreemptionWatch
from scaleforge.core.trainer import Trainer, start_topology
from scaleforge.errors import ConfigError, TrainingDivergedError
from scaleforge.parallel.parallelize import gathered_state_dict


def _snapshot(trainer: Trainer) -> dict[str, dict]:
    """Copies of the model's and the optimizer's state."""
    model = {k: v.detach().clone() for k, v in trainer.model_parts[0].state_dict().items()}
    optimizer = {
        index: {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
        for index, state in trainer.optimizer.state_dict()["state"].items()
    }
    return {"model": model, "optimizer": optimizer}


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_bitwise_equal(a[key], b[key])
        elif torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _poison_output(trainer: Trainer, at_steps: set[int], value: float = math.nan):
    """Multiply the model's logits by `value` during the given (1-based) steps, so the loss
    and every gradient become non-finite there."""

    def hook(module, inputs, output):
        return output * value if trainer.step + 1 in at_steps else output

    return trainer.model_parts[0].output.register_forward_hook(hook)


class CountingBatches:
    """Wraps a batch iterator, counting draws; optionally calls `on_draw(count)`."""

    def __init__(self, batches, on_draw=None):
        self.batches, self.on_draw, self.count = batches, on_draw, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        if self.on_draw:
            self.on_draw(self.count)
        return next(self.batches)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite"),
        ("trainer.max_skipped_steps=0", "trainer.max_skipped_steps"),
        ("trainer.spike_zscore=-1", "trainer.spike_zscore"),
        ("trainer.spike_warmup_steps=0", "trainer.spike_warmup_steps"),
        ("trainer.preemption_signals=[SIGTERM,SIGKILL]", "trainer.preemption_signals"),
        ("trainer.preemption_signals=[SIGNOPE]", "trainer.preemption_signals"),
    ],
)
def test_bad_fault_settings_fail_validation_naming_the_setting(tmp_path, override, named):
    cfg = micro_config(tmp_path, override)
    with pytest.raises(ConfigError, match=named):
        validate(cfg)


def test_fault_defaults_skip_ten_times_detect_spikes_and_watch_sigterm_sigusr1(tmp_path):
    t = micro_config(tmp_path).trainer
    assert (t.on_nonfinite, t.max_skipped_steps, t.spike_zscore) == ("skip", 10, 6.0)
    assert t.preemption_signals == ["SIGTERM", "SIGUSR1"]


def test_nonfinite_loss_skips_update_keeping_weights_and_adam_state_bitwise(tmp_path):
    cfg = micro_config(tmp_path, "trainer.max_steps=6")
    train, val = synthetic_data(cfg)
    batches = CountingBatches(iter(train))
    trainer = Trainer(cfg, tmp_path, data=(batches, val))
    _poison_output(trainer, {3})
    for _ in range(2):
        trainer.train_step(trainer.train_batches)
    before = _snapshot(trainer)
    draws = batches.count
    loss, _ = trainer.train_step(trainer.train_batches)
    assert math.isnan(loss.item()) and trainer.skipped == "loss"
    _assert_bitwise_equal(_snapshot(trainer), before)
    assert all(p.grad is None for p in trainer.model_parts.parameters())  # gradients discarded
    assert trainer.step == 3 and batches.count == draws + trainer.micro_batches
    assert trainer.optimizer.param_groups[0]["lr"] == cfg.optim.lr * lr_factor(2, cfg.optim, 6)
    loss, _ = trainer.train_step(trainer.train_batches)  # training goes on
    assert math.isfinite(loss.item()) and trainer.skipped is None
    assert trainer.nonfinite_guard.consecutive_skips == 0


def test_nonfinite_grad_norm_with_finite_loss_skips_the_update(tmp_path):
    cfg = micro_config(tmp_path)
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    trainer.train_step(trainer.train_batches)
    before = _snapshot(trainer)
    weight = trainer.model_parts[0].output.weight
    handle = weight.register_hook(lambda grad: grad * math.inf)
    loss, grad_norm = trainer.train_step(trainer.train_batches)
    handle.remove()
    assert math.isfinite(loss.item()) and not math.isfinite(grad_norm.item())
    assert trainer.skipped == "grad norm"
    _assert_bitwise_equal(_snapshot(trainer), before)


def test_skipped_step_is_logged_with_a_warning_and_skipped_field(tmp_path, capsys):
    cfg = micro_config(
        tmp_path, "trainer.max_steps=4", "trainer.log_every=2", "trainer.eval_every=4"
    )
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    _poison_output(trainer, {3})
    trainer.fit()
    records = metrics_records(tmp_path)
    assert [r["step"] for r in records] == [0, 2, 3, 4]  # step 3 logged although log_every=2
    assert records[2]["skipped"] is True and records[2]["loss"] == "nan"
    assert "skipped" not in records[1] and "skipped" not in records[3]
    assert math.isfinite(records[3]["loss"])
    out = capsys.readouterr().out
    assert "warning: step 3: non-finite loss; update skipped (1 in a row" in out


def test_on_nonfinite_stop_raises_naming_step_value_and_fix_and_saves_nothing(
    tmp_path, monkeypatch
):
    cfg = micro_config(tmp_path, "trainer.on_nonfinite=stop", "optim.grad_clip=0")
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    saved = []
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self: saved.append(1), raising=False)
    _poison_output(trainer, {2}, math.inf)
    with pytest.raises(TrainingDivergedError) as error:
        trainer.fit()
    message = str(error.value)
    for expected in (
        "step 2",
        "loss is not finite",
        "trainer.on_nonfinite=stop",
        "lower optim.lr (now 0.001)",
        "optim.grad_clip=1.0",
    ):
        assert expected in message
    assert trainer.step == 1 and not saved
    assert not (tmp_path / "final_model.pt").exists()


def test_max_skipped_steps_in_a_row_stop_the_run(tmp_path):
    cfg = micro_config(tmp_path, "trainer.max_steps=8", "trainer.max_skipped_steps=3")
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    _poison_output(trainer, {2, 4, 5, 6, 7})  # 2 is an isolated skip: the count restarts
    with pytest.raises(
        TrainingDivergedError,
        match="step 6: the loss is not finite for the "
        r"3th step in a row \(trainer.max_skipped_steps=3\)",
    ):
        trainer.fit()


def test_fp16_scaler_overflow_is_the_scalers_business_not_a_skip(tmp_path):
    # fp16 itself needs CUDA; a CPU GradScaler over fp32 compute runs the same code path.
    cfg = micro_config(tmp_path)
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    precision = Precision("fp16", lambda: torch.autocast("cpu", enabled=False), scaler)
    trainer.precision = trainer.train_module.precision = precision
    trainer.train_step(trainer.train_batches)
    before = _snapshot(trainer)
    handle = trainer.model_parts[0].output.weight.register_hook(lambda grad: grad * math.inf)
    trainer.train_step(trainer.train_batches)
    handle.remove()
    assert trainer.skipped is None and trainer.nonfinite_guard.consecutive_skips == 0
    assert scaler.get_scale() == 2.0**9  # the scaler saw the overflow and lowered the scale
    # and it skipped the update itself
    _assert_bitwise_equal(_snapshot(trainer)["model"], before["model"])
    trainer.train_step(trainer.train_batches)
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 2


def test_spike_detector_flags_a_jump_after_warmup_only():
    detector = LossSpikeDetector(zscore=6.0, warmup_steps=20)
    noise = [0.01 * math.sin(1.7 * i) for i in range(60)]
    assert not any(detector.update(3.0 + n) for n in noise[:19])
    assert not detector.update(5.0)  # the 20th loss: still warming up
    detector = LossSpikeDetector(zscore=6.0, warmup_steps=20)
    assert not any(detector.update(3.0 - 0.01 * i + n) for i, n in enumerate(noise))
    detector = LossSpikeDetector(zscore=6.0, warmup_steps=20)
    assert not any(detector.update(2.5 + n) for n in noise)  # a plateau, std about 0.005
    assert detector.update(2.6)  # 0.1 above the mean: 20 std
    assert not detector.update(2.5)
    assert not detector.update(math.nan) and not detector.update(math.inf)
    off = LossSpikeDetector(zscore=0.0, warmup_steps=1)
    assert not any(off.update(x) for x in [1.0, 1.0, 100.0])


def test_loss_spike_is_logged_and_changes_no_weight(tmp_path, capsys):
    # The first losses of this run vary by about 1e-3: a z-score of 50 keeps that noise
    # unflagged but not a loss of 15 among losses of 6.25.
    weights = {}
    for zscore in (0, 50):
        cfg = micro_config(
            tmp_path,
            "trainer.max_steps=8",
            "trainer.spike_warmup_steps=4",
            f"trainer.spike_zscore={zscore}",
            "trainer.log_every=4",
            "trainer.eval_every=8",
        )
        trainer = Trainer(cfg, tmp_path / str(zscore), data=synthetic_data(cfg))
        _poison_output(trainer, {7}, 30.0)  # sharper logits: a much larger, finite loss
        trainer.fit()
        weights[zscore] = torch.load(tmp_path / str(zscore) / "final_model.pt")
    _assert_bitwise_equal(weights[0], weights[50])
    assert [r["step"] for r in metrics_records(tmp_path / "0")] == [0, 4, 8]  # detector off
    records = metrics_records(tmp_path / "50")
    assert [r["step"] for r in records] == [0, 4, 7, 8]
    assert records[2]["loss_spike"] is True and "skipped" not in records[2]
    assert not any(r.get("loss_spike") for r in records[:2] + records[3:])
    out = capsys.readouterr().out
    assert re.search(r"warning: step 7: loss spike 15\.\d+ \(running mean 6\.2\d+", out), out


def test_preemption_signal_saves_a_checkpoint_and_returns_after_that_step(
    tmp_path, monkeypatch, capsys
):
    cfg = micro_config(
        tmp_path, "trainer.max_steps=6", "trainer.log_every=3", "trainer.eval_every=6"
    )
    train, val = synthetic_data(cfg)

    def signal_during_step_two(count: int) -> None:
        if count == 2 * trainer.micro_batches:  # step 2 draws its last micro-batch
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer = Trainer(
        cfg, tmp_path, data=(CountingBatches(iter(train), signal_during_step_two), val)
    )
    saved_at = []

    def save_checkpoint(self):
        saved_at.append(self.step)
        return self.run_dir / "checkpoints" / f"step_{self.step}"

    monkeypatch.setattr(Trainer, "save_checkpoint", save_checkpoint, raising=False)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        record = trainer.fit()
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN  # restored
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert saved_at == [2] and trainer.step == 2 and trainer.preempted
    assert record["step"] == 2 and [r["step"] for r in metrics_records(tmp_path)] == [0, 2]
    out = capsys.readouterr().out
    assert f"preempted by SIGUSR1: stopped after step 2 and saved checkpoint {tmp_path}" in out
    assert not (tmp_path / "final_model.pt").exists()


def test_handlers_are_installed_only_in_the_main_thread_and_restored():
    watch = PreemptionWatch(["SIGUSR2"])
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(watch.__enter__().installed))
    thread.start()
    thread.join()
    assert outcome == [False]
    before = signal.getsignal(signal.SIGUSR2)
    with watch:
        assert watch.installed and signal.getsignal(signal.SIGUSR2) != before
        os.kill(os.getpid(), signal.SIGUSR2)
    assert watch.requested == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) == before


def _faults_on_rank_one(cfg, run_dir: Path) -> None:
    """Rank 1 alone sees a NaN loss at step 2 and a SIGUSR1 during step 4; every rank must
    skip the NaN step's update and stop after step 4."""
    topology = start_topology(cfg)
    train, val = synthetic_data(cfg, dp_rank=topology.dp_rank, dp_size=topology.dp_size)

    def signal_rank_one(count: int) -> None:
        if topology.rank == 1 and count == 4 * trainer.micro_batches:
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer = Trainer(
        cfg,
        run_dir,
        topology.world_size,
        data=(CountingBatches(train, signal_rank_one), val),
        topology=topology,
    )
    forward_backward = trainer.train_module.step

    def nan_loss_on_rank_one_at_step_two(batches):
        loss = forward_backward(batches)
        return loss * math.nan if topology.rank == 1 and trainer.step + 1 == 2 else loss

    trainer.train_module.step = nan_loss_on_rank_one_at_step_two
    trainer.train_step(trainer.train_batches)
    before = gathered_state_dict(trainer.model_parts, topology)
    trainer.train_step(trainer.train_batches)
    after = gathered_state_dict(trainer.model_parts, topology)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    skipped = trainer.skipped
    saved_at = []
    trainer.save_checkpoint = lambda: saved_at.append(trainer.step) or run_dir
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        trainer.fit()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    rank = topology.rank
    assert skipped == "loss", f"rank {rank} did not skip rank 1's NaN step"
    assert unchanged, f"rank {rank} applied the update of a NaN step"
    # fit started at step 2; rank 1's signal came during step 4, every rank stopped there
    assert saved_at == [4] and trainer.step == 4 and trainer.preempted
    if topology.is_rank0:
        assert [r["step"] for r in metrics_records(run_dir)] == [0, 4]


def test_nan_loss_and_signal_on_one_rank_skip_and_stop_every_rank_at_the_same_step(tmp_path):
    cfg = micro_config(
        tmp_path,
        "parallel.dp_shard=2",
        "trainer.max_steps=8",
        "trainer.micro_batch_size=2",
        "trainer.log_every=8",
        "parallel.timeout_s=60",
    )
    run_distributed_test(_faults_on_rank_one, world_size=2, func_args=(cfg, tmp_path / "run"))


def test_a_diverged_run_ends_with_one_error_line_and_status_3(capsys):
    from scaleforge.errors import exit_on_config_error

    def diverge():
        raise TrainingDivergedError("step 7: non-finite loss; lower optim.lr")

    with pytest.raises(SystemExit) as stop:
        exit_on_config_error(diverge)
    assert stop.value.code == 3
    assert capsys.readouterr().err == "error: step 7: non-finite loss; lower optim.lr\n"
