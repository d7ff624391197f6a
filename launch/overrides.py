"""The check of sf-train's command-line overrides before Hydra composes them: every
problem at once, one line each, instead of Hydra's first error and its list of options.

A key that is not a setting, a preset name a config group does not offer
(`model=llama_7`) and a value of the wrong type (`optim.lr=abc`) are each a message with
the nearest real name suggested; Hydra's own flags and keys, and multirun sweeps
(`optim.lr=1e-3,3e-3`), pass to Hydra unchecked.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any, get_type_hints

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scaleforge.errors import ConfigError, ConfigErrors
from scaleforge.launch.help import nearest
from scaleforge.launch.key_value import described

# Hydra's own groups and prefixes, which are not settings of Config.
_HYDRA_KEYS = ("hydra", "sweep_plan", "sweep_run")


def config_groups() -> dict[str, list[str]]:
    """Each configs/ group (model, data, ..., experiment) -> the preset names it offers."""
    root = resources.files("scaleforge.configs")
    groups = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_dir() and entry.name not in ("hydra", "sweep_plan", "__pycache__"):
            names = sorted(p.name[:-5] for p in entry.iterdir() if p.name.endswith(".yaml"))
            if names:
                groups[entry.name] = names
    return groups


def check_overrides(overrides: list[str], schema: type) -> None:
    """Raise ConfigError (ConfigErrors for several) with one message per override that
    Hydra would refuse: not key=value grammar, a key that is not a setting of `schema`, a
    preset its group does not have, or a value that is not of the setting's type."""
    settings = setting_types(schema)
    groups = config_groups()
    problems = []
    for text in overrides:
        if text.startswith("-") or "=" not in text:
            continue  # Hydra's flags (--multirun, --config-dir DIR)
        problem = _problem(text, settings, groups, schema)
        if problem:
            problems.append(problem)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigErrors(problems)


def _problem(text: str, settings: dict[str, Any], groups: dict[str, list[str]],
             schema: type) -> str | None:
    try:
        override = OverridesParser.create().parse_override(text)
    except HydraException as error:
        reason = str(error).strip().splitlines()[0]
        return f"{text!r} is not a valid override ({reason})"
    key = override.key_or_group
    if key.split(".")[0] in _HYDRA_KEYS or override.is_delete():
        return None
    if key in groups:
        return _preset_problem(override, key, groups[key])
    kind = settings.get(key)
    if kind is None:
        if _list_item_type(key, settings):
            return None  # data.blend.0.path: an item of a list the preset fills
        return f"{key} is not a setting{nearest(key, settings)}"
    if override.is_sweep_override() or _is_interpolation(override):
        return None
    return _type_problem(override, key, kind, schema)


def _preset_problem(override: Override, group: str, names: list[str]) -> str | None:
    if override.is_sweep_override():
        values = [str(v) for v in override.sweep_iterator()]
    else:
        values = [str(override.value())]
    for value in values:
        if value not in names and value != "null":
            hint = nearest(value, names)
            if not hint:
                hint = f"; the presets are {', '.join(names)}"
            return f"{group}={value} is not a preset of configs/{group}/{hint}"
    return None


def _type_problem(override: Override, key: str, kind: Any, schema: type) -> str | None:
    config = OmegaConf.structured(schema)
    try:
        OmegaConf.update(config, key, override.value(), merge=True)
    except (OmegaConfBaseException, ValueError, TypeError):
        return f"{key}={override.get_value_element_as_str()} is not {described(kind)}"
    return None


def _is_interpolation(override: Override) -> bool:
    value = override.get_value_element_as_str()
    return "${" in value


def setting_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every setting's dotted key -> its type; a list of dataclasses is `key[]` (any index
    below it)."""
    types: dict[str, Any] = {}
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            types.update(setting_types(kind, f"{prefix}{field.name}."))
        elif str(kind).startswith("list[") and "Config" in str(kind):
            types[f"{prefix}{field.name}[]"] = kind
        else:
            types[f"{prefix}{field.name}"] = kind
    return types


def _list_item_type(key: str, settings: dict[str, Any]) -> Any:
    for name, kind in settings.items():
        if name.endswith("[]") and (key == name[:-2] or key.startswith(name[:-2] + ".")):
            return kind
    return None
