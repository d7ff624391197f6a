"""The single-process trainer: learning, precision, accumulation, checkpointing, metrics."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from layout_runs import assert_weights_match, train_and_record, weights_against_bounds
from micro_runs import micro_config, synthetic_data
from run_metrics import metrics_records
from scaleforge.core.trainer import Trainer
from scaleforge.errors import ConfigError
from scaleforge.models import build
from scaleforge.models.loss import cross_entropy
from scaleforge.parallel.activation_checkpoint import apply_activation_checkpointing


def _losses(trainer: Trainer, steps: int) -> list[float]:
    return [trainer.train_step(trainer.train_batches)[0].item() for _ in range(steps)]


def test_thirty_steps_on_tiny_preset_decrease_loss(tmp_path, stdlib_overrides):
    cfg = micro_config(tmp_path, *stdlib_overrides, "trainer.max_steps=30",
                       "trainer.eval_every=30", "optim.lr=3e-3")
    record = Trainer(cfg, tmp_path).fit()
    records = metrics_records(tmp_path)
    first_val, last_val = records[0]["val_loss"], record["val_loss"]
    assert first_val == pytest.approx(math.log(cfg.model.vocab_size), abs=0.2)
    assert last_val < first_val - 1.0
    assert records[-1]["loss"] < records[1]["loss"] - 1.0


def test_metrics_jsonl_and_resolved_config_are_written(tmp_path):
    cfg = micro_config(tmp_path, "trainer.max_steps=4", "trainer.log_every=2",
                       "trainer.eval_every=4")
    Trainer(cfg, tmp_path, data=synthetic_data(cfg)).fit()
    records = metrics_records(tmp_path)
    assert [r["step"] for r in records] == [0, 2, 4]
    for record in records[1:]:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "memory_gb",
                "eta_s"} <= record.keys()
        assert record["tokens_per_s"] > 0
    assert "val_loss" in records[0] and "val_loss" in records[2] and "val_loss" not in records[1]
    assert "mfu" not in records[1]  # no known peak on CPU
    saved = (tmp_path / "config.yaml").read_text()
    assert "max_steps: 4" in saved and "${" not in saved
    state = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert "layers.0.attention.wq.weight" in state


def test_same_seed_gives_bitwise_identical_runs(tmp_path):
    cfg = micro_config(tmp_path)
    runs = [_losses(Trainer(cfg, tmp_path / str(i), data=synthetic_data(cfg)), 4) for i in (0, 1)]
    assert runs[0] == runs[1]
    other = micro_config(tmp_path, "trainer.seed=1")
    assert _losses(Trainer(other, tmp_path / "2", data=synthetic_data(other)), 4) != runs[0]


def test_gradient_accumulation_equals_one_larger_batch(tmp_path):
    whole = micro_config(tmp_path, "trainer.micro_batch_size=8")
    split = micro_config(tmp_path, "trainer.micro_batch_size=2")  # 4 micro-batches per step
    micro_batches: list[int] = []
    a, b = (train_and_record(cfg, tmp_path / name, 4, world_size=1,
                             prepare=lambda trainer: micro_batches.append(trainer.micro_batches))
            for cfg, name in ((whole, "a"), (split, "b")))
    assert micro_batches == [1, 4]
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-6,
                               atol=0)
    # Adam's update divides by sqrt(v) + eps, so an entry whose gradient is rounding noise
    # moves by up to ~lr under re-associated sums: each entry within its Adam bound.
    assert_weights_match(b["final"], a)


def _halve_the_last_micro_batch_gradient(trainer: Trainer) -> None:
    """A wrong accumulation scale: one tensor's gradient from every step's last micro-batch
    halved (as one rank's or one micro-batch's contribution would be by a bug)."""
    calls = iter(range(10**6))
    weight = dict(trainer.model_parts[0].named_parameters())["layers.0.feed_forward.w1.weight"]
    weight.register_hook(lambda grad: grad / 2 if next(calls) % 4 == 3 else grad)


def test_the_adam_bound_catches_a_gradient_halved_in_one_micro_batch_of_four(tmp_path):
    # The bound of assert_weights_match allows rounding noise, not a wrong gradient: the
    # same run with one tensor's last micro-batch of each step halved (about 12% of its
    # gradient) lies far outside it, though losses still agree to 1e-3.
    cfg = micro_config(tmp_path, "trainer.micro_batch_size=2")
    reference = train_and_record(cfg, tmp_path / "reference", 4, world_size=1)
    wrong = train_and_record(cfg, tmp_path / "wrong", 4, world_size=1,
                             prepare=_halve_the_last_micro_batch_gradient)
    worst, where = weights_against_bounds(wrong["final"], reference)
    print(f"{worst:.1f} times the bound: {where}")
    assert worst > 10, where
    assert where.startswith("layers.0.feed_forward.w1.weight")


def test_bf16_autocast_run_stays_close_to_fp32(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = micro_config(tmp_path, f"trainer.precision={precision}")
        runs[precision] = _losses(Trainer(cfg, tmp_path / precision, data=synthetic_data(cfg)), 5)
        assert all(math.isfinite(x) for x in runs[precision])
    torch.testing.assert_close(torch.tensor(runs["bf16"]), torch.tensor(runs["fp32"]),
                               rtol=2e-2, atol=0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_identical_gradients(tmp_path, mode):
    cfg = micro_config(tmp_path)
    torch.manual_seed(0)
    plain = build(cfg.model)
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed, mode)
    assert type(checkpointed.layers["0"]).__name__ == "CheckpointWrapper"
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    inputs, targets = next(synthetic_data(cfg)[0]).tensors()
    for model in (plain, checkpointed):
        cross_entropy(model(inputs), targets).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_learning_rate_follows_the_schedule_during_training(tmp_path):
    cfg = micro_config(tmp_path, "trainer.max_steps=6", "optim.warmup_steps=2",
                       "optim.min_lr_ratio=0.1")
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    lrs = []
    for _ in range(6):
        trainer.train_step(trainer.train_batches)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.5e-3) and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert lrs[2:] == sorted(lrs[2:], reverse=True)


def test_weight_decay_applies_to_matrices_only(tmp_path):
    cfg = micro_config(tmp_path)
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    decayed, plain = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == cfg.optim.weight_decay and plain["weight_decay"] == 0
    assert all(p.ndim == 2 for p in decayed["params"])
    assert all(p.ndim == 1 for p in plain["params"])
    total = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
    assert total == len(list(trainer.model_parts.parameters()))


def test_profile_steps_write_a_chrome_trace_of_those_steps(tmp_path, capsys):
    import json

    from scaleforge.core.config import validate

    cfg = micro_config(tmp_path / "run", "trainer.max_steps=3", "trainer.profile_steps=[2,3]")
    Trainer(cfg, tmp_path / "run", data=synthetic_data(cfg)).fit()
    trace = tmp_path / "run" / "profile" / "rank0_steps2-3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::mm" in str(event.get("name")) for event in events)
    assert f"profile: {trace}" in capsys.readouterr().out
    cfg.trainer.profile_steps = [0, 5]
    with pytest.raises(ConfigError, match=r"trainer\.profile_steps=\[0, 5\] must be"):
        validate(cfg)


def test_tensorboard_logs_the_same_scalars_as_metrics_jsonl(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from scaleforge.core.config import validate

    cfg = micro_config(tmp_path / "run", "trainer.max_steps=3", "trainer.log_every=1",
                       "logging.tensorboard=true")
    Trainer(cfg, tmp_path / "run", data=synthetic_data(cfg)).fit()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [(r["step"], r["loss"]) for r in metrics_records(tmp_path / "run") if "loss" in r]
    scalars = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in scalars] == [step for step, _ in logged] == [1, 2, 3]
    assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-6)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"logging\.tensorboard=true needs the tensorboard"):
        validate(cfg)
