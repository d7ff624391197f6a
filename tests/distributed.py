"""The one harness of the multi-process tests (as OLMo-core's `run_distributed_test`).

`run_distributed_test(func, world_size, ...)` starts `world_size` processes, each with one
thread and the environment torchrun would give it, initialises the process group in each and
runs `func(*func_args)` there. The test's assertions run inside the ranks: when one fails,
the pytest failure names the rank and shows its traceback. A rank that hangs (a collective
nobody else joins, a deadlock) fails the test after `timeout_s` with a dump of its stack.
`func` and its arguments must be picklable (a module-level function).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

HOST = "127.0.0.1"
# Each rank's own limit: its collectives time out, and a rank still running is stopped with
# its stack dumped. Generous: the machine the suite runs on may be shared and loaded.
TIMEOUT_S = 600.0
# The parent's limit on top of TIMEOUT_S, for starting the processes.
STARTUP_S = 60.0
# What the fork server imports once, before it forks the ranks of every call: a rank then
# starts in a fraction of a second instead of importing torch and the package (about 3 s).
# A module missing here (moved, renamed) is skipped by multiprocessing: only the time is lost.
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "pytest", "scaleforge.core.trainer"]


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every rank of one call needs."""

    world_size: int
    backend: str
    port: int
    func: Callable[..., Any]
    func_args: tuple
    directory: str
    timeout_s: float
    cwd: str
    environment: dict[str, str]


def run_distributed_test(
    func: Callable[..., Any],
    world_size: int = 2,
    backend: str = "gloo",
    start_method: str = "forkserver",
    func_args: Sequence[Any] = (),
    timeout_s: float = TIMEOUT_S,
) -> list[Any]:
    """Run `func(*func_args)` in `world_size` ranks with the default process group of
    `backend` initialised; return what `func` returned in each rank, in rank order.

    Ranks start from a fork server that has imported torch (start_method "forkserver", one
    server for the whole test session) or, with "spawn", from a fresh interpreter; either
    way they run in this process's working directory and environment, with
    OMP_NUM_THREADS=1. The process group's store listens in this process on a port the
    operating system picks, so concurrent test runs never race for a port. A failing or
    hung rank fails the calling test (pytest.fail) with the rank's number and traceback;
    the other ranks are stopped."""
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)
    if start_method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    with tempfile.TemporaryDirectory(prefix="distributed-test-") as directory:
        # The fork server, started by the first call, is single-threaded with it too.
        with _environment(OMP_NUM_THREADS="1"):
            job = _Job(world_size, backend, store.port, func, tuple(func_args), directory,
                       timeout_s, os.getcwd(), dict(os.environ))
            context = mp.start_processes(_rank_main, args=(job,), nprocs=world_size,
                                         join=False, start_method=start_method)
        _join(context, world_size, Path(directory), timeout_s + STARTUP_S)
        return [torch.load(Path(directory) / f"rank{rank}.pt", weights_only=False)
                for rank in range(world_size)]


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables (inherited by processes started meanwhile), then restore."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _rank_main(rank: int, job: _Job) -> None:
    """One rank: start the process group, run the function, save its result or traceback."""
    torch.set_num_threads(1)
    os.chdir(job.cwd)
    os.environ.clear()
    os.environ.update(job.environment, MASTER_ADDR=HOST, MASTER_PORT=str(job.port),
                      RANK=str(rank), WORLD_SIZE=str(job.world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(job.world_size))
    out = Path(job.directory)
    with open(out / f"rank{rank}.hung", "w") as hung:
        faulthandler.dump_traceback_later(job.timeout_s, exit=True, file=hung)
        try:
            timeout = datetime.timedelta(seconds=job.timeout_s)
            store = dist.TCPStore(HOST, job.port, is_master=False, timeout=timeout)
            dist.init_process_group(job.backend, store=store, rank=rank,
                                    world_size=job.world_size, timeout=timeout)
            torch.save(job.func(*job.func_args), out / f"rank{rank}.pt")
        except BaseException:  # assertions, pytest.fail and pytest.raises' Failed included
            # Written while the process group is still open: the other ranks fail only once
            # it closes, so the oldest traceback file is the first failure.
            (out / f"rank{rank}.failure").write_text(traceback.format_exc())
            sys.exit(1)
        finally:
            faulthandler.cancel_dump_traceback_later()
            if dist.is_initialized():
                dist.destroy_process_group()


def _join(context: mp.ProcessContext, world_size: int, directory: Path, limit_s: float) -> None:
    """Wait for every rank; fail the test with the first failing rank's traceback."""
    deadline = time.monotonic() + limit_s
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                running = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                for process in context.processes:
                    process.kill()
                    process.join()
                pytest.fail(f"ranks {running} of {world_size} still running after "
                            f"{limit_s:.0f} s", pytrace=False)
        return
    except ProcessException as exited:  # a rank exited non-zero or by a signal
        failure = exited
    # Outside the except block, so the report is not chained to torch's exception.
    pytest.fail(_failure_report(failure, world_size, directory), pytrace=False)


def _failure_report(failure: ProcessException, world_size: int, directory: Path) -> str:
    """Every failed rank's traceback, the first failure first; the stack of a rank that hung;
    torch's account of a rank killed before it could write either."""
    def rank(path: Path) -> str:  # "rank 1 of 2" for rank1.failure and rank1.hung
        return f"rank {path.stem.removeprefix('rank')} of {world_size}"

    failed = sorted(directory.glob("rank*.failure"), key=lambda path: path.stat().st_mtime_ns)
    reports = [f"{rank(path)} failed:\n{path.read_text()}" for path in failed]
    reports += [f"{rank(path)} was still running after its timeout; its threads' stacks:\n"
                f"{path.read_text()}"
                for path in sorted(directory.glob("rank*.hung")) if path.stat().st_size]
    if not reports:
        reports.append(f"rank {failure.error_index} of {world_size}: {failure.msg.strip()}")
    return "\n".join(reports)
