"""What a family hands models/hf.py and models/hf_config.py to convert to and from
Hugging Face `transformers` (`FamilySpec.hf_module` names the module that defines
`HF_ADAPTER`; it is imported only when converting).

The shared code does what every family needs: the tied output weight, the shape checks
against the model `cfg` describes, dropping buffers no model computes from, contiguous
tensors. The adapter does the family's own part: its configs both ways and its tensor
names and layouts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.family import family_names, family_spec

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFAdapter:
    """A family's conversion (see the module docstring).

    model_types: the Hugging Face `model_type`s it reads (e.g. "llama", "qwen3", "mixtral");
    from_config(hf_config, name): our config (not yet checked) of one of them;
    to_config(cfg): the Hugging Face config of a checked `cfg`;
    to_state_dict(state, cfg) / from_state_dict(hf_state, cfg): the tensors renamed and
      reshaped, both sides already checked against `cfg`'s shapes;
    global_keys: our non-layer tensor names -> theirs (embedding, final norm, head);
    published_layout(hf_state, cfg): a published variant of the Hugging Face names (older
      prefixes, per-expert tensors) rewritten as the layout `to_state_dict` writes.
    """

    model_types: tuple[str, ...]
    from_config: Callable[[PretrainedConfig, str], TransformerConfig]
    to_config: Callable[[TransformerConfig], PretrainedConfig]
    to_state_dict: Callable[[Mapping[str, torch.Tensor], TransformerConfig], StateDict]
    from_state_dict: Callable[[Mapping[str, torch.Tensor], TransformerConfig], StateDict]
    global_keys: Mapping[str, str]
    published_layout: Callable[[Mapping[str, torch.Tensor], TransformerConfig], StateDict]


def hf_adapter(cfg: TransformerConfig) -> HFAdapter:
    """The Hugging Face adapter of `cfg`'s family."""
    module = importlib.import_module(family_spec(cfg.family).hf_module)
    adapter: HFAdapter = module.HF_ADAPTER
    return adapter


def adapter_for_model_type(model_type: str | None) -> HFAdapter:
    """The adapter of the family that reads Hugging Face `model_type`; ConfigError listing
    the ones we read otherwise."""
    adapters = [importlib.import_module(family_spec(name).hf_module).HF_ADAPTER
                for name in family_names()]
    for adapter in adapters:
        if model_type in adapter.model_types:
            return adapter
    readable = [kind for adapter in adapters for kind in adapter.model_types]
    raise ConfigError(
        f"Hugging Face model_type={model_type!r} is not supported; sf-convert converts "
        f"{', '.join(map(repr, readable))}"
    )


def rename(
    state: Mapping[str, torch.Tensor],
    n_layers: int,
    global_keys: Mapping[str, str],
    layer_keys: Mapping[str, str],
    source_layer: str,
    target_layer: str,
) -> StateDict:
    """The tensors of `state` named in the two tables under their new names; the fused or
    split ones (GPT-2's q, k, v) are left to the caller, which has checked `state`'s keys
    against the model's already (so a name the model lacks, like a bias, is skipped)."""
    renamed = {target: state[source] for source, target in global_keys.items()}
    for i in range(n_layers):
        source_prefix, target_prefix = source_layer.format(i), target_layer.format(i)
        for source, target in layer_keys.items():
            if source_prefix + source in state:
                renamed[target_prefix + target] = state[source_prefix + source]
    return renamed


def inverse(mapping: Mapping[str, str]) -> dict[str, str]:
    """A name table read the other way."""
    return {theirs: ours for ours, theirs in mapping.items()}


def unchanged(state: Mapping[str, torch.Tensor], cfg: TransformerConfig) -> StateDict:
    """`published_layout` of a family whose published names are the ones it writes."""
    return dict(state)


def refuse(setting: str, value: object, reason: str) -> None:
    """Raise ConfigError for a Hugging Face setting our models cannot represent."""
    raise ConfigError(f"Hugging Face config {setting}={value!r}: {reason}")


# (setting, default when the config lacks it, accepted, why a refused value cannot map).
Refusal = tuple[str, object, Callable[[Any], bool], str]


def check_refusals(hf_config: PretrainedConfig, refusals: tuple[Refusal, ...]) -> None:
    """Refuse the first of `refusals` whose setting `hf_config` holds an unaccepted value."""
    for setting, default, accepted, reason in refusals:
        value = getattr(hf_config, setting, default)
        if not accepted(value):
            refuse(setting, value, reason)


def shared_settings(cfg: TransformerConfig) -> dict[str, Any]:
    """The Hugging Face settings every family writes alike: vocabulary, tying, init std;
    bos/eos ids unset (the tokenizer is not part of the model config)."""
    return {"vocab_size": cfg.vocab_rows, "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std, "bos_token_id": None, "eos_token_id": None}
