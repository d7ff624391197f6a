"""The hang verdict counts the collectives torch issues itself (FSDP, tensor and pipeline
parallelism) through the flight recorder, so a rank stalled outside any of ScaleForge's own
collectives, with the others waiting in one of FSDP's, is still told apart."""

from __future__ import annotations

import json
import pickle
import re

import pytest

from commands import hang_drill
from scaleforge.core.callbacks.hang_watchdog import hang_verdict, issued_collectives
from scaleforge.core.fault_injection import parse_faults

TRAINING_THREAD = 140000000000001


def _entry(record_id, pg_id, seq, name, thread=TRAINING_THREAD, where="core/trainer.py"):
    return {"record_id": record_id, "pg_id": pg_id, "collective_seq_id": seq,
            "p2p_seq_id": 0, "profiling_name": name, "thread_id": str(thread),
            "frames": [{"name": "all_gather", "filename": "/x/site-packages/torch/c10d.py",
                        "line": 1},
                       {"name": "step", "filename": where, "line": 53}]}


def test_issued_collectives_sums_every_group_of_the_training_thread_and_names_the_last():
    entries = [_entry(0, 0, 1, "gloo:all_reduce"),
               _entry(1, 3, 7, "gloo:all_gather"),   # a group whose older entries rolled off
               _entry(2, 5, 2, "gloo:broadcast", thread=99),  # another thread's (snapshots)
               _entry(3, 0, 2, "gloo:all_gather_into_tensor")]
    record = pickle.dumps({"version": "2.10", "entries": entries})
    found = issued_collectives(record, TRAINING_THREAD)
    assert found["collectives_issued"] == 2 + 7
    assert found["last_issued"].startswith("gloo:all_gather_into_tensor from ")
    assert found["last_issued"].endswith(":53 in step")
    assert issued_collectives(None, TRAINING_THREAD) == {}
    assert issued_collectives(record, 12345) == {}


def test_the_verdict_tells_apart_ranks_with_equal_steps_and_joins_by_issued_collectives():
    def dump(rank, issued, last):
        return {"rank": rank, "last_step": 2, "collectives_joined": 9,
                "stalled_at": f"core/stall.py:{rank} in f", "collectives_issued": issued,
                "last_issued": last}

    dumps = {0: dump(0, 41, "gloo:all_gather from core/train_modules/plain.py:53 in step"),
             1: dump(1, 40, "gloo:all_reduce from core/health.py:70 in agree_on_step")}
    line = hang_verdict(dumps, 2, 10)
    assert line.startswith("hang: rank 1 stopped progressing first (last completed step 2, "
                           "9 collectives joined, 40 issued in all) - stalled: rank 1 at "
                           "core/stall.py:1 in f, last issued gloo:all_reduce"), line
    assert ("rank 0 went further and waits (rank 0: 9 joined, 41 issued, at core/stall.py:0 "
            "in f, last issued gloo:all_gather from core/train_modules/plain.py:53") in line
    # without a flight recorder on every rank: the counts of ScaleForge's own collectives
    del dumps[0]["collectives_issued"]
    assert "ranks 0, 1 stopped progressing first" in hang_verdict(dumps, 2, 10)


def test_a_hang_at_the_step_start_is_a_drill_too():
    (fault,) = parse_faults("hang:rank=1:step=3:at=start")
    assert (fault.kind, fault.rank, fault.step, fault.at) == ("hang", 1, 3, "start")
    assert parse_faults("hang:rank=1:step=3")[0].at == "collective"


RUN = [
    "model=llama_micro", "data.vocab_size=512", "data.seq_len=64",
    "trainer.micro_batch_size=2", "trainer.global_batch_tokens=256",
    "trainer.precision=fp32", "trainer.device=cpu", "trainer.log_every=1",
    "trainer.eval_batches=2", "optim.warmup_steps=2", "logging.wandb=disabled",
    "logging.progress_bar=false", "trainer.max_steps=50", "trainer.eval_every=50",
    "parallel.dp_shard=2",
]
HANG_TIMEOUT_S = 10


@pytest.mark.slow
def test_a_rank_stalled_before_fsdps_all_gather_is_named_with_the_call_the_other_waits_in(
        tmp_path, stdlib_overrides):
    run_dir = tmp_path / "run"
    _, _, verdict = hang_drill(tmp_path, 2, *RUN, *stdlib_overrides, f"run_dir={run_dir}",
                               fault="hang:rank=1:step=3:at=start",
                               hang_timeout_s=HANG_TIMEOUT_S)
    headers = {rank: json.loads((run_dir / "hang" / f"rank{rank}.txt").read_text()
                                .splitlines()[0]) for rank in (0, 1)}
    # ScaleForge's own counts cannot tell them apart: both finished step 2 and joined as many
    assert headers[0]["last_step"] == headers[1]["last_step"] == 2
    assert headers[0]["collectives_joined"] == headers[1]["collectives_joined"]
    assert headers[0]["in_collective"] is None  # rank 0 waits in one of FSDP's
    assert headers[0]["collectives_issued"] > headers[1]["collectives_issued"]
    assert verdict.startswith("hang: rank 1 stopped progressing first"), verdict
    assert "core/callbacks/faults.py" not in verdict  # the drill's own frames left out
    waiting = re.search(r"rank 0 went further and waits \(.*last issued (gloo:\S+) from (.*)\)",
                        verdict)
    assert waiting, verdict
    print(verdict)
