"""Conversion between ScaleForge models and Hugging Face `transformers` models.

Each family converts through its adapter (models/hf_adapter.py, in models/<family>/):

    llama <-> LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    gpt   <-> GPT2LMHeadModel
    llama with model.moe <-> MixtralForCausalLM (experts: models/llama/hf_mixtral.py)

The config conversion is models/hf_config.py. The state-dict functions are pure (no I/O):
state dicts map our single-process keys (`layers.0.attention.wq.weight`, see
models/transformer.py) to Hugging Face's (`model.layers.0.self_attn.q_proj.weight`) and back.
`save_hf` and `load_hf` read and write a Hugging Face model directory (config.json +
safetensors; never pickles). A setting one side cannot represent raises ConfigError naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from scaleforge.errors import ConfigError
from scaleforge.models.build import build
from scaleforge.models.config import TransformerConfig
from scaleforge.models.hf_adapter import StateDict, hf_adapter
from scaleforge.models.hf_config import from_hf_config, to_hf_config
from scaleforge.models.state_dict import check_state_dict_shapes

# Buffers some published checkpoints carry that no model computes from: GPT-2's causal
# masks and old Llama exports' RoPE frequencies.
IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def expected_state_dict(cfg: TransformerConfig) -> StateDict:
    """Our model's state dict for `cfg` as meta tensors: the names and shapes, no memory."""
    return build(cfg, device="meta").state_dict()


def _with_tied_output(
    state_dict: Mapping[str, torch.Tensor], embed: str, output: str, tied: bool
) -> StateDict:
    """`state_dict` with the output weight filled in from the embedding when the two are tied
    and a writer kept only one copy (safetensors files and deduplicating savers do)."""
    state = dict(state_dict)
    if tied and output not in state and embed in state:
        state[output] = state[embed]
    return state


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: TransformerConfig) -> StateDict:
    """Our single-process state dict -> the state dict of `to_hf_config(cfg)`'s model.

    Tensors are shared, not copied, where the layout is the same; fused or transposed ones
    (GPT-2's Conv1D) are copies. Raises ConfigError naming the first tensor whose name or
    shape does not fit `cfg`.
    """
    state = _with_tied_output(
        state_dict, "tok_embeddings.weight", "output.weight", cfg.tie_embeddings
    )
    check_state_dict_shapes(expected_state_dict(cfg), state, f"{cfg.family} model state dict")
    hf = hf_adapter(cfg).to_state_dict(state, cfg)
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def from_hf_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], cfg: TransformerConfig
) -> StateDict:
    """A Hugging Face state dict of `cfg`'s family -> our single-process state dict for `cfg`.

    Accepts the published variants (the adapter's `published_layout`: e.g. GPT-2 files
    without the `transformer.` prefix, Mixtral's per-expert tensors), causal-mask and
    inv_freq buffers (dropped), tied models saved without `lm_head.weight`. Raises
    ConfigError naming the first tensor whose name or shape does not fit `cfg`.
    """
    adapter = hf_adapter(cfg)
    state = {
        name: tensor
        for name, tensor in hf_state_dict.items()
        if not name.endswith(IGNORED_HF_SUFFIXES)
    }
    state = adapter.published_layout(state, cfg)
    embed, output = to_hf_key(cfg, "tok_embeddings.weight"), to_hf_key(cfg, "output.weight")
    state = _with_tied_output(state, embed, output, cfg.tie_embeddings)
    expected = to_hf_state_dict(expected_state_dict(cfg), cfg)
    check_state_dict_shapes(expected, state, "Hugging Face state dict")
    ours = adapter.from_state_dict(state, cfg)
    if cfg.tie_embeddings:
        ours["output.weight"] = ours["tok_embeddings.weight"]
    return {name: tensor.contiguous() for name, tensor in ours.items()}


def to_hf_key(cfg: TransformerConfig, name: str) -> str:
    """The Hugging Face name of our global (non-layer) tensor `name`."""
    return hf_adapter(cfg).global_keys[name]


def to_hf_model(
    state_dict: Mapping[str, torch.Tensor],
    cfg: TransformerConfig,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """The `transformers` model of `to_hf_config(cfg)` (LlamaForCausalLM, GPT2LMHeadModel,
    ...) in eval mode holding our weights in `dtype`."""
    hf_config = to_hf_config(cfg)
    hf_state = to_hf_state_dict(state_dict, cfg)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(hf_config)
    model.load_state_dict(hf_state, strict=True)
    # PreTrainedModel.to is decorated with functools.wraps(nn.Module.to), which the stubs
    # type as an unbound function expecting the module first.
    return model.to(dtype).eval()  # type: ignore[arg-type]


def save_hf(
    state_dict: Mapping[str, torch.Tensor],
    cfg: TransformerConfig,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write our weights as a Hugging Face model directory (config.json + model.safetensors),
    loadable with `AutoModelForCausalLM.from_pretrained(out_dir)`; return `out_dir`."""
    out_dir = Path(out_dir)
    to_hf_model(state_dict, cfg, dtype).save_pretrained(out_dir)
    if not _safetensors_files(out_dir):
        raise RuntimeError(f"save_pretrained wrote no safetensors file into {out_dir}")
    return out_dir


def load_hf(hf_dir: Path) -> tuple[TransformerConfig, StateDict]:
    """Read a local Hugging Face directory of a model_type some family reads (config.json +
    *.safetensors, sharded or not) as (our config, our state dict). Never unpickles and
    never downloads; tensors keep the file's dtype."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"hf={hf_dir} is not a Hugging Face model directory: no config.json")
    files = _safetensors_files(hf_dir)
    if not files:
        raise ConfigError(
            f"hf={hf_dir} holds no model.safetensors (nor an index of shards); sf-convert "
            "reads safetensors only, never pickled .bin files; re-save the model with "
            "save_pretrained(dir, safe_serialization=True)"
        )
    hf_config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    cfg = from_hf_config(hf_config, name=hf_dir.resolve().name)
    hf_state: StateDict = {}
    for path in files:
        hf_state.update(load_file(path))
    return cfg, from_hf_state_dict(hf_state, cfg)


def _safetensors_files(hf_dir: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json; [] if none."""
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [hf_dir / shard for shard in shards]
    return []


def peft_adapter_state(state_dict: Mapping[str, torch.Tensor],
                       cfg: TransformerConfig) -> tuple[StateDict, list[str]]:
    """A LoRA model's adapters (`x.lora_a`, `x.lora_b`, models/lora.py) in PEFT's layout:
    (`base_model.model.<Hugging Face module>.lora_A.weight` / `.lora_B.weight` -> tensor,
    the target module names), for `peft.PeftModel.from_pretrained` on the Hugging Face export
    of the base. ConfigError for a projection the family does not map one to one (GPT-2's
    fused, transposed c_attn)."""
    from scaleforge.models.lora import is_adapter

    base = {k: v for k, v in state_dict.items() if not is_adapter(k)}
    hf_cfg = replace(cfg, lora=type(cfg.lora)())
    # Renamed tensors are shared, not copied (to_hf_state_dict): found by their storage.
    by_storage = {(t.data_ptr(), tuple(t.shape)): name
                  for name, t in to_hf_state_dict(base, hf_cfg).items()}
    adapters: StateDict = {}
    targets: set[str] = set()
    for key in state_dict:
        if not key.endswith(".lora_a"):
            continue
        projection = key.removesuffix(".lora_a")
        weight = base[f"{projection}.weight"]
        hf_name = by_storage.get((weight.data_ptr(), tuple(weight.shape)))
        if hf_name is None:
            raise ConfigError(
                f"peft: {projection} has no Hugging Face projection of the same layout in "
                f"model.family={cfg.family}; export the merged model only (leave peft unset)"
            )
        module = hf_name.removesuffix(".weight")
        targets.add(module.rsplit(".", 1)[-1])
        adapters[f"base_model.model.{module}.lora_A.weight"] = state_dict[key].contiguous()
        adapters[f"base_model.model.{module}.lora_B.weight"] = (
            state_dict[f"{projection}.lora_b"].contiguous())
    return adapters, sorted(targets)
