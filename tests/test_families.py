"""Model families are specs (models/family.py): shared code never asks which family it has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scaleforge.errors import ConfigError
from scaleforge.models import TransformerConfig, build, num_params
from scaleforge.models.family import family_names, family_spec

REPO = Path(__file__).resolve().parent.parent
FAMILY_SWITCH = re.compile(r"family (==|!=)")


def test_an_unregistered_family_fails_at_start_in_one_line_naming_the_setting():
    cfg = TransformerConfig(family="mamba")
    with pytest.raises(ConfigError) as error:
        cfg.check("model")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("model.family='mamba' is not a registered model family")
    for name in family_names():
        assert name in message


@pytest.mark.parametrize("count", [
    lambda cfg: num_params(cfg), lambda cfg: cfg.mlp_hidden, lambda cfg: build(cfg, "meta"),
])
def test_an_unregistered_family_gets_no_other_familys_numbers(count):
    with pytest.raises(ConfigError, match="not a registered model family"):
        count(TransformerConfig(family="mamba"))


def test_every_registered_family_builds_and_counts_its_parameters():
    for name in family_names():
        spec = family_spec(name)
        cfg = TransformerConfig(family=name, n_layers=2, d_model=32, n_heads=4, vocab_size=97,
                                max_seq_len=16)
        model = build(cfg, "meta")
        assert sum(p.numel() for p in model.parameters()) == num_params(cfg), spec.name


def test_no_family_switch_outside_the_family_folders():
    """A comparison of a family name (== or !=) only inside models/<family>/ (issue 26)."""
    family_folders = {REPO / "models" / name for name in family_names()}
    found = []
    for source in REPO.rglob("*.py"):
        if any(part.startswith(".") for part in source.relative_to(REPO).parts):
            continue
        if source.parent in family_folders:
            continue
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if FAMILY_SWITCH.search(line):
                found.append(f"{source.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
