"""Errors meant for users, imported by every package (a leaf: it imports nothing of ours).

Each message names the setting, its value and the fix."""

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is wrong. Raised before any work starts; the launcher prints it as one line."""


class KernelBuildError(ConfigError):
    """The fused kernels (scaleforge.csrc) cannot be built on this machine: the one-line
    message names what is missing (compiler, ninja, nvcc) or where the build failed."""


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm stopped being finite and the run cannot go on; the message
    names the step, the value and what to change."""


def exit_on_config_error(task: Callable[..., T], *args: Any) -> T:
    """Run `task(*args)`; print a ConfigError as one `error:` line and exit with 2, a
    TrainingDivergedError likewise with 3.

    Under torchrun every rank raises the same error (validation runs before any process
    group exists; the non-finite decision is agreed over all ranks); only rank 0 ($RANK)
    prints it, and every rank exits with the same status.
    """
    try:
        return task(*args)
    except (ConfigError, TrainingDivergedError) as error:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(error, ConfigError) else 3)
