"""`sf-train --help`: every setting with its value and meaning, for the config the other
arguments compose.

It imports neither torch nor the settings' modules (which do): the schema is read from the
dataclasses' source (launch/settings_source.py) and Hydra composes the presets over its
defaults, so help answers in about a second."""

from __future__ import annotations

from scaleforge.launch.help import setting_lines
from scaleforge.launch.overrides import config_groups
from scaleforge.launch.settings_source import defaults, read_class

CONFIG = ("scaleforge.core.config", "Config")


def train_help(doc: str, overrides: list[str]) -> str:
    """The help text: `doc`, the groups' presets, then every setting of the config that
    `overrides` compose (so `sf-train model=llama_7b --help` shows that model's values)."""
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    schema = read_class(*CONFIG)
    ConfigStore.instance().store(name="schema", node=OmegaConf.create(defaults(schema)))
    with initialize_config_module(config_module="scaleforge.configs", version_base=None):
        config = compose(config_name="config", overrides=list(overrides))
    groups = config_groups()
    lines = [doc.strip(), "", "presets (group=NAME; +experiment=NAME for experiment):"]
    lines += [f"  {group}: {', '.join(names)}" for group, names in groups.items()]
    lines += ["", "settings (key=value; the values this command line composes):"]
    lines += setting_lines(schema, config)
    return "\n".join(lines)
