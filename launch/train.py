"""`sf-train`: train a model from a Hydra config. Run it alone or under torchrun.

    sf-train +experiment=demo trainer.max_steps=200 run_dir=runs/mine
    torchrun --nproc-per-node 4 -m scaleforge.launch.train parallel.tp=2 parallel.dp_shard=-1

Every rank validates the config before any process group exists, so a bad setting stops all
ranks with exit status 2 and one `error:` line (from rank 0), and none waits in a collective.
Hydra's own output (.hydra/) and the console's copy (train.log) are written by rank 0 only.

`trainer.dry_run=true` builds everything on every rank, prints each rank's memory and exits
0 before step 1 (planner/dry_run.py). `trainer.eval_only=true trainer.init_from=CKPT` prints
the validation loss and perplexity of a checkpoint on the configured data and exits.

SIGTERM or SIGUSR1 (`trainer.preemption_signals`) during training saves a checkpoint and
exits with status 0 (without scaling.json, which marks a finished run); see core/preemption.py.
A rank without training progress for `trainer.hang_timeout_s` ends the run: every rank
exits with status 4 after one line naming the rank that stopped first and its stalled call
(core/callbacks/hang_watchdog.py; stacks in RUN_DIR/hang/).
Under `--multirun` SIGINT does too, and the whole sweep stops there (no further job starts).

Under `--multirun` each job trains in its own `<hydra.sweep.dir>/<hydra.sweep.subdir>`
(`run_dir` is ignored there). Every finished run leaves `scaling.json` (N, D, C, losses).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from scaleforge.errors import ConfigError, exit_on_config_error, messages_of
from scaleforge.launch.key_value import is_help

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from scaleforge.core.trainer import Trainer

# torch, Hydra and the settings' modules are imported where a run needs them, not here:
# `sf-train --help` (launch/train_help.py) answers without them.

# Ranks other than 0 keep Hydra from writing a second copy of its files (whose timestamped
# directory could differ from rank 0's by a second).
_NON_ZERO_RANK_OVERRIDES = [
    "hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none",
    "hydra/hydra_logging=none",
]


def train(cfg: DictConfig) -> dict:
    """Validate, start the process group (when WORLD_SIZE > 1), build and train; return the
    last logged metrics record (an empty one after a dry run). Errors after start-up name the
    failing rank's coordinates."""
    import torch.distributed as dist
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from scaleforge.core.config import to_config
    from scaleforge.core.derived_settings import derive_settings
    from scaleforge.core.trainer import Trainer, start_topology
    from scaleforge.scaling.run_record import write_run_record

    null_vocab = OmegaConf.select(cfg, "model.vocab_size") is None
    config = to_config(cfg)  # resolves model.vocab_size=null from the data's vocabulary
    for warning in derive_settings(config):
        if int(os.environ.get("RANK", 0)) == 0:
            print(warning, flush=True)
    if null_vocab and config.model.vocab_size is not None and int(os.environ.get("RANK", 0)) == 0:
        print(f"model.vocab_size=null: the tokenizer's {config.data.vocab_size:,} ids rounded "
              f"up to a multiple of 128: {config.model.vocab_size:,}", flush=True)
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun:
        # every job of a sweep gets its own directory, <hydra.sweep.dir>/<hydra.sweep.subdir>;
        # a run_dir shared by all jobs would mix their metrics
        config.run_dir = HydraConfig.get().runtime.output_dir
        signals = config.trainer.preemption_signals
        if signals and "SIGINT" not in signals:  # Ctrl-C stops a sweep as SIGTERM does
            config.trainer.preemption_signals = [*signals, "SIGINT"]
    if config.trainer.dry_run_gpu is not None:
        from scaleforge.planner.hardware import gpu_spec

        gpu_spec(config.trainer.dry_run_gpu)  # an unknown name stops every rank before start
    from scaleforge.parallel.run_setup import errors_labelled

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    topology = start_topology(config, world_size)
    try:
        with errors_labelled(topology):
            trainer = Trainer(config, Path(config.run_dir), world_size, topology=topology)
            if config.trainer.dry_run:
                from scaleforge.planner.dry_run import report_dry_run

                report_dry_run(trainer)
                return {}
            if config.trainer.eval_only:
                return evaluate_only(trainer)
            record = trainer.fit()
        if topology.is_rank0:
            if not trainer.preempted:  # scaling.json marks a finished run
                write_run_record(config, trainer.run_dir)
            print(f"run directory: {trainer.run_dir.resolve()}", flush=True)
        if multirun and trainer.preempted:
            # Hydra would start the next job; a signal to the sweep stops all of it.
            if topology.is_rank0:
                print("sweep stopped after this job's checkpoint; rerun the same command to "
                      "continue it (finished jobs end at once, this one resumes)", flush=True)
            raise SystemExit(0)
        return record
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def evaluate_only(trainer: Trainer) -> dict:
    """`trainer.eval_only=true`: the validation loss and perplexity of the loaded weights,
    printed by rank 0 as one line and returned as a metrics record."""
    source = trainer.resumed_from or trainer.initialised_from
    if source is None:
        raise ConfigError(
            "trainer.eval_only=true evaluates a checkpoint: set trainer.init_from=RUN_OR_STEP_DIR "
            "(or trainer.resume= a checkpoint)"
        )
    record = {"step": trainer.step, **trainer.val_metrics()}
    if trainer.topology.is_rank0:
        print(f"eval: {source} on {trainer.cfg.trainer.eval_batches} validation batches: "
              f"val_loss {record['val_loss']:.4f}, val_ppl {record['val_ppl']:.2f}", flush=True)
    return record


def _train_or_exit(cfg: DictConfig) -> None:
    exit_on_config_error(train, cfg, on_error=_record_for_torchrun)


def _hydra_main() -> None:
    """Hydra's main over `_train_or_exit`, under torchrun's error recorder."""
    import hydra
    from torch.distributed.elastic.multiprocessing.errors import record

    from scaleforge.core.config import register_configs

    register_configs()
    main_function = hydra.main(version_base=None, config_path="../configs",
                               config_name="config")(_train_or_exit)
    record(main_function)()


def _record_for_torchrun(error: BaseException, status: int) -> None:
    """Under torchrun: write `error` into torchrun's error file ($TORCHELASTIC_ERROR_FILE,
    the format of torch.distributed.elastic's ErrorHandler), so torchrun's failure summary
    shows its `error:` lines where it would show a traceback, then exit with the other ranks
    (`_exit_with_the_other_ranks`). Nothing when run alone."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    lines = messages_of(error) if isinstance(error, ConfigError) else [str(error)]
    text = "\n".join(f"error: {line}" for line in lines)
    record = {"message": {"message": f"{type(error).__name__}: {text}",
                          "extraInfo": {"py_callstack": text,
                                        "timestamp": str(int(time.time()))}}}
    Path(path).write_text(json.dumps(record))
    _exit_with_the_other_ranks(status)


def _exit_with_the_other_ranks(status: int, wait_s: float = 60) -> None:
    """Wait (at most `wait_s`) until every rank has reached its error exit, counted in
    torchrun's own key-value store, answering torchrun's SIGTERM with `status` meanwhile, then
    exit with `status` at once (os._exit after flushing): torchrun terminates the others as
    soon as one rank exits, so a rank still validating would end with -15 instead of the
    error's status, and so would one in the interpreter's shutdown, which puts SIGTERM's
    default action back (1 run in 6 did before the immediate exit)."""
    import signal
    from datetime import timedelta

    signal.signal(signal.SIGTERM, lambda *_: os._exit(status))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        from torch.distributed import TCPStore

        world_size = int(os.environ.get("WORLD_SIZE", 1))
        key = (f"scaleforge/exiting/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
               f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}")
        try:
            store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=timedelta(seconds=wait_s))
            arrived = store.add(key, 1)
            deadline = time.monotonic() + wait_s
            while arrived < world_size and time.monotonic() < deadline:
                time.sleep(0.05)
                arrived = store.add(key, 0)
        except (RuntimeError, KeyError, ValueError):
            pass  # no store to count in: exit now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main() -> None:
    arguments = sys.argv[1:]
    if is_help(arguments):
        from scaleforge.launch.train_help import train_help

        print(train_help(__doc__ or "", [a for a in arguments if not a.startswith("-")]))
        return
    from scaleforge.core.config import Config
    from scaleforge.launch.overrides import check_overrides

    exit_on_config_error(check_overrides, arguments, Config, on_error=_record_for_torchrun)
    if int(os.environ.get("RANK", 0)) != 0:
        sys.argv.extend(_NON_ZERO_RANK_OVERRIDES)
    _hydra_main()


if __name__ == "__main__":
    main()
