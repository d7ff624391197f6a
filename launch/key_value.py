"""key=value command-line arguments as a typed settings dataclass, and subcommand dispatch.

`sf-sweep`, `sf-convert` and `sf-preprocess` declare each subcommand's settings as a
dataclass (defaults, types, a docstring) and read their arguments with `parse_settings`:
the arguments are merged into `OmegaConf.structured(schema)`, so an unknown key, a value of
the wrong type and a missing required setting are each a ConfigError naming the key.

Values are read the way a user types them: a text setting takes its value verbatim (a glob
like `*.jsonl` or a word like `off` stays text; `null` is None where None is allowed); other
settings are read as YAML by `OmegaConf.from_dotlist` (`[a,b]` lists, `1e12` floats, `true`,
`null`), and a whole float such as `1e3` is accepted for an integer setting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, field, fields
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar, get_args, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scaleforge.errors import ConfigError
from scaleforge.launch.help import nearest, setting_lines

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
# A subcommand's name -> (its settings dataclass, the function that takes the parsed settings).
Handlers = dict[str, tuple[type["DataclassInstance"], Callable[[Any], object]]]

_REQUIRED = "required"  # field metadata: how to write the value in the error if it is missing
_PRESET = "preset"  # field metadata: the configs/ directory of the YAML presets it names


def required(value: str) -> Any:
    """A dataclass field without a default; when it is missing the error asks for
    `key=<value>`, so `value` shows what to give, e.g. "DIR (a checkpoint or run directory)"."""
    return field(metadata={_REQUIRED: value})


def preset(directory: str) -> Any:
    """A dataclass field (default None) naming a preset: `key=NAME` first loads the settings
    of configs/<directory>/NAME.yaml; the other key=value arguments override them."""
    return field(default=None, metadata={_PRESET: directory})


def parse_settings(schema: type[T], arguments: list[str], command: str) -> T:
    """The `schema` dataclass from key=value `arguments` of `command` (e.g. "sf-sweep fit"),
    over the schema's defaults and any preset the arguments name.

    Raises ConfigError, prefixed with `command`, naming an argument that is not key=value or
    whose key is not a setting, a value of the wrong type, or the required settings missing.
    """
    declared = {f.name: f for f in fields(schema)}
    types = get_type_hints(schema)
    given = {}
    for argument in arguments:
        key, sep, text = argument.partition("=")
        if not sep or key not in declared:
            problem = _not_a_setting(argument, key if sep else None, declared)
            raise ConfigError(f"{command}: {problem}")
        given[key] = text
    config = OmegaConf.structured(schema)
    for key, text in given.items():
        if _PRESET in declared[key].metadata and text != "null":
            config = _merge_preset(config, declared[key].metadata[_PRESET], key, text, command)
    for key, text in given.items():
        try:
            config = OmegaConf.merge(config, _argument_config(key, text, types[key]))
        except (OmegaConfBaseException, yaml.YAMLError):
            problem = f"{key}={text!r} is not {described(types[key])}"
            raise ConfigError(f"{command}: {problem}") from None
    # An empty `key=` leaves a required setting missing too.
    missing = [f for f in declared.values() if _has_no_default(f)
               and (OmegaConf.is_missing(config, f.name) or config[f.name] in ("", None, []))]
    if missing:
        raise ConfigError(f"{command} needs {_listed(_wanted(f) for f in missing)}")
    settings = OmegaConf.to_object(config)
    if not isinstance(settings, schema):
        raise TypeError(f"{command}: the settings did not resolve to {schema.__name__}")
    return settings


def _not_a_setting(argument: str, key: str | None, declared: dict[str, Field]) -> str:
    names = ", ".join(declared)
    if key is None:
        return (f"{argument!r} is not key=value; the settings are "
                f"{names}{nearest(argument, declared)}")
    return (f"{argument!r} is not one of {names} ({key!r} is not a setting of this "
            f"command{nearest(key, declared)})")


def _argument_config(key: str, text: str, kind: Any) -> DictConfig:
    """One argument as a config to merge over the settings (see the module docstring)."""
    if kind is str or set(get_args(kind)) == {str, type(None)}:
        return OmegaConf.create({key: None if text == "null" and kind is not str else text})
    config = OmegaConf.from_dotlist([f"{key}={text}"])
    value = config[key]
    if kind is int and isinstance(value, float) and value.is_integer():
        config[key] = int(value)
    return config


def _merge_preset(config: DictConfig, directory: str, key: str, name: str,
                  command: str) -> DictConfig:
    """`config` with the settings of configs/<directory>/<name>.yaml merged over it."""
    where = f"configs/{directory}/{name}.yaml"
    path = resources.files("scaleforge.configs") / directory / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{command}: {key}={name}: there is no {where}")
    values = OmegaConf.create(path.read_text())
    unknown = sorted(set(values) - set(config))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]} is not a setting of {command}")
    try:
        merged = OmegaConf.merge(config, values)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {error.full_key}: {error.msg}") from None
    if not isinstance(merged, DictConfig):
        raise ConfigError(f"{where} must hold key: value settings, not a list")
    return merged


def described(kind: Any) -> str:
    """What a value of type `kind` is, in words: "a number or null", "a list[float], ..."."""
    if str(kind).startswith("list"):
        return f"a {kind}, written [a,b,c]"
    optional = type(None) in get_args(kind)
    if optional:
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    words = _TYPE_WORDS.get(kind, f"a valid {getattr(kind, '__name__', kind)}")
    return f"{words} or null" if optional else words


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


def _has_no_default(declared: Field) -> bool:
    return declared.default is MISSING and declared.default_factory is MISSING


def _wanted(declared: Field) -> str:
    return f"{declared.name}={declared.metadata.get(_REQUIRED, '...')}"


def _listed(items: Iterable[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def settings_help(schema: type[DataclassInstance], command: str) -> str:
    """`command`'s settings, one line each: key=default and its meaning (launch/help.py)."""
    defaults = {f.name: f.default if f.default is not MISSING
                else f.default_factory() if f.default_factory is not MISSING else MISSING
                for f in fields(schema)}
    return "\n".join([f"{command} settings (key=value):", *setting_lines(schema, defaults)])


def print_help(schema: type[DataclassInstance], command: str, doc: str) -> None:
    """Print `doc` (a module docstring) and `command`'s settings to stdout."""
    print(f"{doc.strip()}\n\n{settings_help(schema, command)}")


def is_help(argv: list[str]) -> bool:
    """Whether the arguments ask for help (-h or --help)."""
    return any(argument in ("-h", "--help") for argument in argv)


def run_subcommand(program: str, handlers: Handlers, argv: list[str], doc: str = "") -> None:
    """Run `program`'s subcommand `argv[0]`: `handlers` maps its name to (settings
    dataclass, function); the function gets the settings parsed from `argv[1:]`.
    `--help` prints `doc` and the settings of every subcommand (or of the one named)."""
    if is_help(argv):
        chosen = [argv[0]] if argv[0] in handlers else list(handlers)
        sections = [settings_help(handlers[name][0], f"{program} {name}") for name in chosen]
        print("\n\n".join([doc.strip(), *sections]))
        return
    if not argv or argv[0] not in handlers:
        given = f"{argv[0]!r} is not a command{nearest(argv[0], handlers)} " if argv else ""
        raise ConfigError(f"{given}give a command: {program} {{{'|'.join(handlers)}}} "
                          "key=value ...")
    schema, handler = handlers[argv[0]]
    handler(parse_settings(schema, argv[1:], f"{program} {argv[0]}"))
