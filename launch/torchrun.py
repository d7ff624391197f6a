"""`sf-torchrun`: torchrun, quiet when the training stopped with its own one-line reason.

    sf-torchrun --nproc-per-node 2 -m scaleforge.launch.train parallel.tp=2

Takes exactly torchrun's arguments and runs torchrun's own code (`torch.distributed.run`).
When sf-train stops for a reason it has already printed in one line (a config error:
status 2; a diverged run: 3; a hung rank: 4), every rank exits with that status, and so does
this command, with nothing more on the console. Plain `torchrun` cannot be quietened from
inside its workers: its launcher process logs "failed (exitcode: 2) ..." and then lets
`ChildFailedError` end it with a Python traceback and a table of the failed ranks (about 40
lines; its own status is 1), all after the workers have exited. Any other failure (a crash,
a signal) still shows torchrun's full report, and its status.
"""

from __future__ import annotations

import logging
import os
import sys

from scaleforge.core.callbacks.hang_watchdog import HANG_EXIT_STATUS

# The statuses whose reason sf-train has printed in one line (errors.exit_on_config_error,
# core/callbacks/hang_watchdog.py).
STOPPED_WITH_A_LINE = (2, 3, HANG_EXIT_STATUS)
# The logger of torchrun's per-failure line and its closing-signal lines
# (torch/distributed/elastic/multiprocessing/api.py; messages "failed (exitcode: %s)
# local_rank: ..." and "Sending process %s closing signal %s" on torch 2.11 and 2.13).
_FAILURE_LOGGER = "torch.distributed.elastic.multiprocessing.api"


class _QuietOwnStop(logging.Filter):
    """On torchrun's per-failure logger: drops the "failed (exitcode: N)" line when N is a
    status of STOPPED_WITH_A_LINE (the rank's own line said why), and with it the "Sending
    process P closing signal SIGTERM" lines torchrun logs just before it for the ranks still
    running (a rank can exit a moment before the others). Those lines are held until the
    failure line decides, and let through otherwise (`release`: a crash, or no failure)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.releasing = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if self.releasing:
            return True
        if message.startswith("Sending process") and "closing signal" in message:
            self.held.append(record)
            return False
        if message.startswith("failed (exitcode:"):
            ours = (isinstance(record.args, tuple) and bool(record.args)
                    and record.args[0] in STOPPED_WITH_A_LINE)
            if ours:
                self.held = []
                return False
            self.release()
        return True

    def release(self) -> None:
        """Let the held lines through, in order."""
        held, self.held = self.held, []
        self.releasing = True
        try:
            for record in held:
                logging.getLogger(record.name).handle(record)
        finally:
            self.releasing = False


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if determine_local_world_size(args.nproc_per_node) > 1:
        # torchrun's default for several processes per node, without its 4-line notice.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    quiet = _QuietOwnStop()
    logging.getLogger(_FAILURE_LOGGER).addFilter(quiet)
    try:
        run(args)
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        if failure.exitcode in STOPPED_WITH_A_LINE:
            sys.exit(failure.exitcode)
        raise
    finally:
        quiet.release()


if __name__ == "__main__":
    main()
