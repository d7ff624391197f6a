"""`--help` text read from the settings dataclasses' source (launch/settings_source.py:
each setting's meaning is its comment or the docstring sentence naming it), and
nearest-key suggestions."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Iterator
from typing import Any

from scaleforge.launch.settings_source import SourceClass, read_class


def setting_lines(settings: type | SourceClass, values: Any, prefix: str = "") -> Iterator[str]:
    """One line per setting of `settings` (a dataclass, or one read from its source by
    launch/settings_source.py; nested sections walked): `key=value` and its meaning;
    `values` holds the current values (a dataclass instance or a mapping)."""
    cls = settings if isinstance(settings, SourceClass) else read_class(
        settings.__module__, settings.__qualname__)
    for field in cls.fields:
        value = _get(values, field.name)
        if field.nested is not None:
            yield from setting_lines(field.nested, value, f"{prefix}{field.name}.")
            continue
        shown = "(required)" if value is dataclasses.MISSING or value == "???" else _shown(value)
        key = f"  {prefix}{field.name}={shown}"
        if not field.meaning:
            yield key
        elif len(key) < 38:
            yield f"{key:<38}{field.meaning}"
        else:
            yield f"{key}\n{'':<38}{field.meaning}"


def _get(values: Any, name: str) -> Any:
    if values is None:
        return None
    if isinstance(values, dict):
        return values.get(name)
    try:
        return getattr(values, name)
    except Exception:  # an OmegaConf MISSING value ("???") raises on access
        return dataclasses.MISSING


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "{" + ", ".join(f"{f.name}: {_shown(getattr(value, f.name))}"
                               for f in dataclasses.fields(value)) + "}"
    return str(value)


def nearest(key: str, known: Iterable[str]) -> str:
    """ "; did you mean X?" for the known key closest to `key`, or "" when none is close."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""
