"""`sf-train --help` (every setting with its value and meaning, for the config the other
arguments compose) and the check that each override names a real setting, with the
nearest one suggested for a typo."""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import get_type_hints

from scaleforge.core.config import Config, compose, to_config
from scaleforge.errors import ConfigError, ErrorCollector
from scaleforge.launch.help import nearest, setting_lines

# Hydra's own groups and prefixes, which are not settings of Config.
_HYDRA_KEYS = ("hydra", "experiment", "sweep_plan", "sweep_run")


def config_groups() -> dict[str, list[str]]:
    """Each configs/ group (model, data, ...) -> the preset names it offers."""
    root = resources.files("scaleforge.configs")
    groups = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_dir() and entry.name not in ("hydra", "sweep_plan", "__pycache__"):
            names = sorted(p.name[:-5] for p in entry.iterdir() if p.name.endswith(".yaml"))
            if names:
                groups[entry.name] = names
    return groups


def train_help(doc: str, overrides: list[str]) -> str:
    """The help text: `doc`, the groups' presets, then every setting of the config that
    `overrides` compose (so `sf-train model=llama_7b --help` shows that model's values)."""
    config = to_config(compose(overrides))
    groups = config_groups()
    lines = [doc.strip(), "", "presets (group=NAME; +experiment=NAME for experiment):"]
    lines += [f"  {group}: {', '.join(names)}" for group, names in groups.items()]
    lines += ["", "settings (key=value; the values this command line composes):"]
    lines += setting_lines(Config, config)
    return "\n".join(lines)


def check_override_keys(overrides: list[str]) -> None:
    """Raise ConfigError naming each key=value override whose key is not a setting, with
    the nearest setting suggested; group choices (`model=NAME`) and Hydra's keys pass."""
    known = _setting_keys(Config)
    groups = set(config_groups())
    problems = []
    for override in overrides:
        if override.startswith("-") or "=" not in override:
            continue  # Hydra's flags (--multirun, --config-dir DIR)
        key = override.lstrip("+~").partition("=")[0]
        if key.split(".")[0] in _HYDRA_KEYS or key in groups or key in known:
            continue
        if any(k.endswith("[]") and (key == k[:-2] or key.startswith(k[:-2] + "."))
               for k in known):
            continue
        problems.append(f"{key} is not a setting{nearest(key, known)}")
    collector = ErrorCollector()
    for problem in problems:
        collector.run(_raise, problem)
    collector.raise_if_any()


def _raise(message: str) -> None:
    raise ConfigError(message)


def _setting_keys(cls: type, prefix: str = "") -> list[str]:
    """Every setting's dotted key; a list of dataclasses is `key[]` (any index below it)."""
    keys = []
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            keys += _setting_keys(kind, f"{prefix}{field.name}.")
        elif str(kind).startswith("list[") and "Config" in str(kind):
            keys.append(f"{prefix}{field.name}[]")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys
