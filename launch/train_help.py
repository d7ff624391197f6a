"""`sf-train --help`: every setting with its value and meaning, for the config the other
arguments compose."""

from __future__ import annotations

from scaleforge.core.config import Config, compose, to_config
from scaleforge.launch.help import setting_lines
from scaleforge.launch.overrides import config_groups


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
