"""The parts of each rank's step time (core/callbacks/step_timing.py) that the straggler
callback gathers every log interval: in the record on the CPU, and on CUDA timed with
events that are read only when the interval is gathered."""

from __future__ import annotations

import time

import pytest
import torch

from micro_runs import micro_config, synthetic_data
from run_metrics import metrics_records
from scaleforge.core.callbacks.step_timing import CUDA_PARTS, PARTS, StepTimer, TimedBatches
from scaleforge.core.trainer import Trainer

DATA_WAIT_S = 0.02


def _slow(batches):
    for batch in batches:
        time.sleep(DATA_WAIT_S)
        yield batch


def test_each_part_of_the_step_is_in_the_record_of_every_interval_on_cpu(tmp_path):
    cfg = micro_config(tmp_path, "trainer.max_steps=4", "trainer.log_every=2",
                       "trainer.eval_every=0")
    train, val = synthetic_data(cfg)
    trainer = Trainer(cfg, tmp_path, data=(_slow(train), val))
    trainer.fit()
    records = [r for r in metrics_records(tmp_path) if "step_s/rank0" in r]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        part = {name: record[f"{name}/rank0"] for name in PARTS}
        assert all(seconds >= 0 for seconds in part.values()), part
        # the data wait: trainer.micro_batches sleeps per step, and none of it is compute
        assert part["data_s"] >= DATA_WAIT_S * trainer.micro_batches, part
        assert part["compute_s"] < part["step_s"] - part["data_s"] + 1e-3, part
        assert part["forward_backward_s"] > 0 and part["optimizer_s"] > 0, part
        inside = part["data_s"] + part["forward_backward_s"] + part["optimizer_s"]
        assert inside <= part["step_s"] + 1e-6, part


class FakeEvent:
    """A CUDA event's interface over a fake clock: `record` takes the clock's time."""

    clock_ms = 0.0
    made = 0
    synchronized = 0

    def __init__(self):
        FakeEvent.made += 1
        self.at = None

    def record(self):
        self.at = FakeEvent.clock_ms

    def synchronize(self):
        FakeEvent.synchronized += 1

    def elapsed_time(self, end):
        return end.at - self.at


def _fake_step(timer: StepTimer, forward_backward_ms: float, optimizer_ms: float) -> None:
    timer.start()
    FakeEvent.clock_ms += forward_backward_ms
    timer.backward_done()
    FakeEvent.clock_ms += optimizer_ms
    timer.update_done()
    timer.end()


def test_cuda_parts_come_from_events_read_only_when_the_interval_is_gathered():
    timer = StepTimer(cuda=True, make_event=FakeEvent)
    for forward_backward_ms, optimizer_ms in [(30, 10), (50, 20)]:
        _fake_step(timer, forward_backward_ms, optimizer_ms)
    assert FakeEvent.synchronized == 0  # recording never waits for the device
    means = timer.read()
    assert FakeEvent.synchronized == 1 and means is not None
    assert set(means) == set(CUDA_PARTS)  # no exposed communication on CUDA
    assert means["forward_backward_s"] == pytest.approx(0.040)
    assert means["optimizer_s"] == pytest.approx(0.015)
    assert means["compute_s"] == pytest.approx(0.055)
    made = FakeEvent.made
    _fake_step(timer, 10, 10)
    assert FakeEvent.made == made  # the first interval's events are reused
    assert timer.read()["optimizer_s"] == pytest.approx(0.010)
    assert timer.read() is None  # an empty interval


def test_the_data_wait_is_the_time_spent_in_next():
    timer = StepTimer(cuda=False)
    timer.start()
    batches = TimedBatches(_slow(iter(range(3))), timer)
    assert list(batches) == [0, 1, 2]
    assert timer.data_s >= 3 * DATA_WAIT_S


@pytest.mark.cuda
def test_cuda_events_time_the_parts_of_a_step_on_the_gpu(tmp_path):
    cfg = micro_config(tmp_path, "trainer.device=cuda", "trainer.max_steps=4",
                       "trainer.log_every=2", "trainer.eval_every=0")
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg))
    trainer.fit()
    records = [r for r in metrics_records(tmp_path) if "step_s/rank0" in r]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert record["forward_backward_s/rank0"] > 0 and record["optimizer_s/rank0"] > 0
        assert "exposed_comm_s/rank0" not in record
    assert torch.cuda.is_available()
