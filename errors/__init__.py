"""Errors meant for users, imported by every package (a leaf: it imports nothing of ours).

Each message names the setting, its value and the fix."""

import os
import sys
from collections.abc import Callable, Collection
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is wrong. Raised before any work starts; the launcher prints it as one line."""


class ConfigErrors(ConfigError):
    """Several settings are wrong at once: `messages` holds one line each (the launcher
    prints an `error:` line for every one)."""

    def __init__(self, messages: list[str]):
        super().__init__("\n".join(messages))
        self.messages = messages


def check_choice(setting: str, value: object, allowed: Collection[str]) -> None:
    """Raise ConfigError naming `setting` when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{setting}={value!r} is not one of {', '.join(allowed)}")


def messages_of(error: ConfigError) -> list[str]:
    """The one-line messages an error holds: several for ConfigErrors, else its own."""
    return list(error.messages) if isinstance(error, ConfigErrors) else [str(error)]


class ErrorCollector:
    """Runs independent checks and keeps every ConfigError they raise, so a config's
    mistakes are all reported in one start:

        problems = ErrorCollector()
        problems.run(cfg.trainer.check, "trainer")
        problems.raise_if_any()
    """

    def __init__(self) -> None:
        self.messages: list[str] = []

    def run(self, check: Callable[..., Any], *args: Any) -> bool:
        """Call `check(*args)`; keep its ConfigError. True when it passed."""
        try:
            check(*args)
        except ConfigError as error:
            self.messages.extend(m for m in messages_of(error) if m not in self.messages)
            return False
        return True

    def raise_if_any(self) -> None:
        """Raise the collected problems: the one ConfigError, or ConfigErrors for several."""
        if len(self.messages) == 1:
            raise ConfigError(self.messages[0])
        if self.messages:
            raise ConfigErrors(self.messages)


class KernelBuildError(ConfigError):
    """The fused kernels (scaleforge.csrc) cannot be built on this machine: the one-line
    message names what is missing (compiler, ninja, nvcc) or where the build failed."""


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm stopped being finite and the run cannot go on; the message
    names the step, the value and what to change."""


def exit_on_config_error(task: Callable[..., T], *args: Any,
                         on_error: Callable[[BaseException, int], None] | None = None) -> T:
    """Run `task(*args)`; print a ConfigError as one `error:` line (ConfigErrors as one line
    per problem) and exit with 2, a TrainingDivergedError likewise with 3.

    Under torchrun every rank raises the same error (validation runs before any process
    group exists; the non-finite decision is agreed over all ranks); only rank 0 ($RANK)
    prints it, and every rank exits with the same status. `on_error(error, status)` runs on
    every rank after the printing, before the exit (sf-train records the error for
    torchrun's summary and waits for the other ranks, so that all exit with `status`).
    """
    try:
        return task(*args)
    except (ConfigError, TrainingDivergedError) as error:
        if int(os.environ.get("RANK", 0)) == 0:
            lines = messages_of(error) if isinstance(error, ConfigError) else [str(error)]
            for line in lines:
                print(f"error: {line}", file=sys.stderr, flush=True)
        status = 2 if isinstance(error, ConfigError) else 3
        if on_error is not None:
            on_error(error, status)
        sys.exit(status)
