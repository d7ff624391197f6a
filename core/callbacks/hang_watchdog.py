"""The hang watchdog: a rank that makes no progress for `trainer.hang_timeout_s` dumps its
stacks, and the run ends with one line naming the rank that stopped first and where.

The training loop heartbeats (a step starts, a step ends, a record is written); a daemon
thread per rank wakes every second or so. When the last beat is older than the timeout it
writes RUN_DIR/hang/rank<R>.txt: a first line of JSON (rank, last completed step, the
collectives it joined through parallel/collectives.py and the one it is in, the stalled
call, and from the flight recorder the collectives its training thread issued in every
process group, torch's own included, and the last one) and then the training thread's
stack and every thread's (faulthandler). It waits up to `GRACE_S` for the other ranks'
dumps (the ranks share the run directory: one machine, or shared storage on a cluster),
compares them (`hang_verdict`): the ranks with the lowest (last completed step,
collectives issued, collectives joined) stopped first; the lowest-numbered rank with a
dump prints the verdict and writes RUN_DIR/hang/verdict.txt, and every rank exits with
status `HANG_EXIT_STATUS`, so torchrun ends (or, with --max-restarts, restarts) the job
long before the collective timeout (`parallel.timeout_s`) would.

`enable_flight_recorder` (called before the process group starts) turns on torch's flight
recorder of collectives (TORCH_FR_BUFFER_SIZE, formerly TORCH_NCCL_TRACE_BUFFER_SIZE) and
NCCL's dump on timeout, and the watchdog writes this rank's record of its last collectives
to RUN_DIR/hang/rank<R>.flight_recorder (NCCL's where torch has it, gloo's on the CPU
wheels; torch's `python -m torch.distributed.flight_recorder.fr_trace` reads them).
"""

from __future__ import annotations

import faulthandler
import json
import os
import pickle
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaleforge.core.callbacks import Callback
from scaleforge.core.metrics import MetricsLogger
from scaleforge.parallel.collectives import PROGRESS
from scaleforge.torch_compat import dump_flight_recorder

if TYPE_CHECKING:
    from scaleforge.core.trainer import Trainer

# The exit status of every rank of a run the watchdog ends.
HANG_EXIT_STATUS = 4
# How long a rank that dumped waits for the other ranks' dumps before judging without them.
GRACE_S = 10.0
# Frames a stack's "stalled call" leaves out: a fault drill's own sleep and the collectives'
# bookkeeping around it, so a drill names the collective it stalls as a real hang would.
DRILL_FRAMES = (("core/callbacks/faults.py", None), ("contextlib.py", None),
                ("parallel/collectives.py", "_joining"))
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

# The flight recorder: how many collectives each rank keeps (TORCH_FR_BUFFER_SIZE, torch
# 2.11+'s name for TORCH_NCCL_TRACE_BUFFER_SIZE, which 2.13 warns about), and NCCL's dump
# when its own watchdog times a collective out (set only where the user has not).
FLIGHT_RECORDER_ENV = {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


def enable_flight_recorder() -> None:
    """Set NCCL's flight-recorder variables (FLIGHT_RECORDER_ENV) unless already set; they
    must be in the environment before the process group starts."""
    for name, value in FLIGHT_RECORDER_ENV.items():
        os.environ.setdefault(name, value)


class HangWatchdogCallback(Callback):
    """Heartbeats from the loop and the watchdog thread that watches them (module doc).
    `timeout_s` 0 turns it off."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int, world_size: int):
        self.timeout_s = timeout_s
        self.hang_dir = run_dir / "hang"
        self.rank = rank
        self.world_size = world_size
        self.last_beat = time.monotonic()
        self.completed_step = 0
        self.thread_id: int | None = None
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def pre_train(self, trainer: Trainer) -> None:
        if self.timeout_s <= 0:
            return
        self.hang_dir.mkdir(parents=True, exist_ok=True)
        (self.hang_dir / f"rank{self.rank}.txt").unlink(missing_ok=True)  # an older attempt's
        self.completed_step = trainer.step
        self.thread_id = threading.get_ident()
        self.beat()
        self.stopped.clear()
        self.thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def pre_step(self, trainer: Trainer) -> None:
        self.beat()

    def post_step(self, trainer: Trainer, logger: MetricsLogger) -> dict[str, bool]:
        self.completed_step = trainer.step
        self.beat()
        return {}

    def post_log(self, trainer: Trainer) -> None:
        self.beat()

    def post_train(self, trainer: Trainer) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 10)
        while not self.stopped.wait(period):
            silent = time.monotonic() - self.last_beat
            if silent > self.timeout_s:
                self._end_run(silent)

    def _end_run(self, silent: float) -> None:
        """Dump, wait for the others' dumps, report (the lowest rank that dumped), exit."""
        self._dump(silent)
        dumps = self._wait_for_dumps()
        if self.rank == min(dumps):
            line = hang_verdict(dumps, self.world_size, self.timeout_s)
            (self.hang_dir / "verdict.txt").write_text(line + "\n")
            print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(HANG_EXIT_STATUS)

    def _dump(self, silent: float) -> None:
        frame = sys._current_frames().get(self.thread_id or 0)
        stack = traceback.extract_stack(frame) if frame is not None else []
        record = dump_flight_recorder()
        header = {
            "rank": self.rank,
            "last_step": self.completed_step,
            "collectives_joined": PROGRESS.joined,
            "in_collective": PROGRESS.current,
            "stalled_at": stalled_call(stack),
            "seconds_without_progress": round(silent, 1),
            **issued_collectives(record, self.thread_id or 0),
        }
        path = self.hang_dir / f"rank{self.rank}.txt"
        partial = path.with_suffix(".partial")
        with open(partial, "w") as out:
            out.write(json.dumps(header) + "\n\ntraining thread (innermost last):\n")
            out.write("".join(traceback.format_list(stack)))
            out.write("\nevery thread (faulthandler):\n")
            out.flush()
            faulthandler.dump_traceback(out, all_threads=True)
        os.replace(partial, path)
        if record is not None:
            (self.hang_dir / f"rank{self.rank}.flight_recorder").write_bytes(record)

    def _wait_for_dumps(self) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + GRACE_S
        while True:
            dumps = read_dumps(self.hang_dir)
            if len(dumps) >= self.world_size or time.monotonic() > deadline:
                return dumps
            time.sleep(0.2)


def stalled_call(stack: list[traceback.FrameSummary]) -> str:
    """'file:line in function <- its caller' for the two innermost frames of our package in
    `stack` (outermost first; paths relative to the package), leaving out DRILL_FRAMES;
    else the innermost frame; '?' for an empty stack."""
    ours = [frame for frame in stack if _ours(frame) and not any(
        frame.filename.endswith(name) and function in (None, frame.name)
        for name, function in DRILL_FRAMES)]
    if not ours:
        return f"{stack[-1].filename}:{stack[-1].lineno} in {stack[-1].name}" if stack else "?"
    return " <- ".join(f"{os.path.relpath(frame.filename, PACKAGE_ROOT)}:{frame.lineno} in "
                       f"{frame.name}" for frame in reversed(ours[-2:]))


def issued_collectives(record: bytes | None, thread_id: int) -> dict[str, Any]:
    """From this rank's flight-recorder record (a pickle, `torch_compat.
    dump_flight_recorder`): how many collectives the training thread `thread_id` issued in
    every process group, torch's own included (FSDP's, tensor and pipeline parallelism's:
    the sum of each group's sequence numbers, which count on past the record's ring
    buffer), and the last one, named with where the package issued it. {} without a
    record or without any collective of that thread in it."""
    try:
        entries = pickle.loads(record).get("entries", []) if record else []
    except (pickle.UnpicklingError, AttributeError, EOFError):
        return {}
    ours = [e for e in entries if str(e.get("thread_id")) == str(thread_id)]
    if not ours:
        return {}
    issued: dict[Any, int] = {}
    for entry in ours:
        count = entry["collective_seq_id"] + entry["p2p_seq_id"]
        issued[entry["pg_id"]] = max(issued.get(entry["pg_id"], 0), count)
    last = max(ours, key=lambda entry: entry["record_id"])
    frames = [traceback.FrameSummary(f["filename"], f["line"], f["name"])
              for f in reversed(last.get("frames", []))]
    return {"collectives_issued": sum(issued.values()),
            "last_issued": f"{last['profiling_name']} from {stalled_call(frames)}"}


def _ours(frame: traceback.FrameSummary) -> bool:
    relative = os.path.relpath(frame.filename, PACKAGE_ROOT)
    return not relative.startswith(".") and "site-packages" not in relative


def read_dumps(hang_dir: Path) -> dict[int, dict[str, Any]]:
    """The first lines (JSON headers) of the complete rank<R>.txt dumps in `hang_dir`."""
    dumps = {}
    for path in hang_dir.glob("rank*.txt"):
        with open(path) as dump:
            header = json.loads(dump.readline())
        dumps[header["rank"]] = header
    return dumps


def hang_verdict(dumps: dict[int, dict[str, Any]], world_size: int, timeout_s: float) -> str:
    """One line: the rank(s) that stopped progressing first (lowest last completed step,
    then fewest collectives issued where every dump counts them, then fewest joined) and
    where, from the ranks' dump headers."""
    # The flight recorder's count (torch's collectives included) where every rank has one.
    issued = all("collectives_issued" in dump for dump in dumps.values())

    def progress(rank: int) -> tuple[int, int, int]:
        dump = dumps[rank]
        return (dump["last_step"], dump["collectives_issued"] if issued else 0,
                dump["collectives_joined"])

    def last(rank: int) -> str:
        return f", last issued {dumps[rank]['last_issued']}" if issued else ""

    first = min(progress(rank) for rank in dumps)
    stopped = sorted(rank for rank in dumps if progress(rank) == first)
    others = sorted(set(dumps) - set(stopped))
    where = "; ".join(f"rank {rank} at {dumps[rank]['stalled_at']}{last(rank)}"
                      for rank in stopped)
    names = ", ".join(str(rank) for rank in stopped)
    counted = f", {first[1]} issued in all" if issued else ""
    line = (f"hang: rank{'s' if len(stopped) > 1 else ''} {names} stopped progressing first "
            f"(last completed step {first[0]}, {first[2]} collectives joined{counted}) - "
            f"stalled: {where}")
    if others:
        waiting = dumps[others[0]]
        counted = f", {waiting['collectives_issued']} issued" if issued else ""
        line += (f"; rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} went "
                 f"further and wait{'' if len(others) > 1 else 's'} (rank {others[0]}: "
                 f"{waiting['collectives_joined']} joined{counted}, at "
                 f"{waiting['stalled_at']}{last(others[0])})")
    else:
        line += "; no rank got further than another"
    if missing := sorted(set(range(world_size)) - set(dumps)):
        line += f"; no dump from ranks {', '.join(map(str, missing))}"
    return (line + f" (no progress for trainer.hang_timeout_s={timeout_s:g} s; stacks in "
            "RUN_DIR/hang/rank<R>.txt)")
