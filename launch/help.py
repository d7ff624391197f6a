"""`--help` text read from the settings dataclasses themselves, and nearest-key suggestions.

A setting's meaning is the comment block right above its field (or a comment at the end of
its line) in the dataclass's source; without one, the sentence of the class docstring that
names it in backticks. Help therefore cannot drift from the code that defines the setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import textwrap
from collections.abc import Iterable, Iterator
from typing import Any, get_type_hints

_FIELD = re.compile(r"^(\w+)\s*:[^=#]*(?:=\s*(.*?))?\s*(?:#\s*(.*))?$")


def field_meanings(cls: type) -> dict[str, str]:
    """Field name -> its meaning, from the comments and docstrings of dataclass `cls` and of
    the dataclasses it inherits fields from (its own meaning first)."""
    meanings: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            meanings.update({name: meaning for name, meaning in _own_meanings(klass).items()
                             if meaning or name not in meanings})
    return meanings


def _own_meanings(cls: type) -> dict[str, str]:
    """Field name -> its meaning as `cls`'s own source and docstring give it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    meanings: dict[str, str] = {}
    comments: list[str] = []
    for line in source.splitlines()[1:]:
        if not line.startswith("    ") or line.startswith("     "):
            comments = [] if line.strip() else comments
            continue
        stripped = line.strip()
        if stripped.startswith("#"):
            comments.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD.match(stripped)
        if match and not stripped.startswith(("def ", "@")):
            trailing = match.group(3)
            meanings[match.group(1)] = " ".join([*comments, *([trailing] if trailing else [])])
        comments = []
    doc = inspect.getdoc(cls) or ""
    sentences = re.split(r"(?<=[.;:])\s+", " ".join(doc.split()))
    for field in dataclasses.fields(cls):
        if not meanings.get(field.name):
            named = [s for s in sentences if f"`{field.name}`" in s]
            meanings[field.name] = named[0] if named else ""
    return meanings


def setting_lines(cls: type, values: Any, prefix: str = "") -> Iterator[str]:
    """One line per setting of dataclass `cls` (nested dataclasses walked): `key = value`
    and its meaning; `values` holds the current values (a dataclass instance or mapping)."""
    meanings = field_meanings(cls)
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        value = _get(values, field.name)
        kind = hints.get(field.name)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            yield from setting_lines(kind, value, f"{prefix}{field.name}.")
            continue
        shown = "(required)" if value is dataclasses.MISSING else _shown(value)
        key = f"  {prefix}{field.name}={shown}"
        meaning = meanings.get(field.name, "")
        if not meaning:
            yield key
        elif len(key) < 38:
            yield f"{key:<38}{meaning}"
        else:
            yield f"{key}\n{'':<38}{meaning}"


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
