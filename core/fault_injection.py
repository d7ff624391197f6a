"""Fault drills: the one place that reads `SCALEFORGE_INJECT_FAULT`.

Faults are injected for tests and drills through this environment variable only; unset (or
empty) it does nothing. Its value is one fault or several separated by commas, each a kind
and `key=value` fields joined by colons:

    hang:rank=1:step=3        rank 1 stops inside the first collective of step 3 (it sleeps
                              before joining it; the other ranks wait there for it);
                              `at=start`: as step 3 starts, outside any collective (under
                              FSDP the others then wait in its first all-gather)
    slow:rank=1:factor=1.5    rank 1 computes each step 1.5x as long (it spins, using the
                              CPU, for 0.5x the step's own compute time), from step 1 or
                              from `step=N`
    kill:rank=1:step=5        rank 1 sends itself SIGKILL as step 5 starts

    SCALEFORGE_INJECT_FAULT=hang:rank=1:step=3,slow:rank=2:factor=1.2

`hang` and `kill` fire in a job's first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT
unset or 0), so a restarted job does not meet them again. A malformed value is a ConfigError
naming the variable, raised before any process group exists (`core.config.validate`).
The trainer's `FaultInjectionCallback` (core/callbacks/faults.py) carries the faults out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from scaleforge.errors import ConfigError

VARIABLE = "SCALEFORGE_INJECT_FAULT"
KINDS = {"hang": ("rank", "step"), "slow": ("rank", "factor"), "kill": ("rank", "step")}
OPTIONAL = {"slow": ("step",), "hang": ("at",)}
HANG_AT = ("collective", "start")
EXAMPLE = "hang:rank=1:step=3, slow:rank=1:factor=1.5 or kill:rank=1:step=5 (comma-separated)"


@dataclass(frozen=True)
class Fault:
    """One injected fault: `kind` (hang, slow, kill) on `rank` at step `step` (1-based; slow:
    from that step on) with a `factor` (slow only), hanging `at` (hang only)."""

    kind: str
    rank: int
    step: int = 1
    factor: float = 1.0
    at: str = "collective"  # hang only: before the step's first collective, or its start


def parse_faults(value: str) -> list[Fault]:
    """The faults a SCALEFORGE_INJECT_FAULT value names ([] for an empty one); ConfigError
    naming the variable and the wrong part otherwise."""
    if ";" in value:
        raise ConfigError(f"{VARIABLE}={value!r}: separate faults with ',' (not ';'); write "
                          f"e.g. {EXAMPLE}")
    return [_parse_one(part.strip(), value) for part in value.split(",") if part.strip()]


def _parse_one(part: str, value: str) -> Fault:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{VARIABLE}={value!r}: {part!r} {why}; write e.g. {EXAMPLE}")

    kind, *fields = part.split(":")
    if kind not in KINDS:
        raise bad(f"has an unknown kind {kind!r} (hang, slow or kill)")
    allowed = KINDS[kind] + OPTIONAL.get(kind, ())
    settings: dict[str, str] = {}
    for field_text in fields:
        key, equals, text = field_text.partition("=")
        if not equals or key not in allowed or key in settings:
            raise bad(f"has {field_text!r}; {kind} takes {', '.join(allowed)} once "
                      "each, as key=value")
        settings[key] = text
    if missing := [key for key in KINDS[kind] if key not in settings]:
        raise bad(f"lacks {', '.join(missing)}")
    try:
        rank = int(settings["rank"])
        step = int(settings.get("step", "1"))
        factor = float(settings.get("factor", "1"))
    except ValueError:
        raise bad("has a value that is not a number (rank and step are integers)") from None
    if rank < 0 or step < 1:
        raise bad("needs rank >= 0 and step >= 1")
    if kind == "slow" and not factor > 1:
        raise bad("needs factor > 1 (1.5 computes each step 1.5x as long)")
    at = settings.get("at", HANG_AT[0])
    if at not in HANG_AT:
        raise bad(f"has at={at!r} (at=collective or at=start)")
    return Fault(kind, rank, step, factor, at)


def injected_faults() -> list[Fault]:
    """The faults `SCALEFORGE_INJECT_FAULT` names in this process's environment ([] unset)."""
    return parse_faults(os.environ.get(VARIABLE, ""))


def first_attempt() -> bool:
    """Whether this is a job's first attempt (torchrun restarts set a count above 0)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
