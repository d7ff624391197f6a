"""Conversion between ScaleForge models and Hugging Face `transformers` models.

    llama <-> LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    gpt   <-> GPT2LMHeadModel
    llama with model.moe <-> MixtralForCausalLM (experts: models/hf_mixtral.py)

The config conversion is models/hf_config.py. The state-dict functions are pure (no I/O):
state dicts map our single-process keys (`layers.0.attention.wq.weight`, see
models/transformer.py) to Hugging Face's (`model.layers.0.self_attn.q_proj.weight`) and back.
`save_hf` and `load_hf` read and write a Hugging Face model directory (config.json +
safetensors; never pickles).

Layouts that need care:
- RoPE: models/rope.py rotates halves (channel i with i + head_dim/2), as Hugging Face Llama
  does, so q/k rows copy without permutation (Meta's original checkpoints interleave pairs
  and need one; their Hugging Face conversions already applied it).
- GPT-2: Hugging Face's Conv1D stores weights as (in, out), the transpose of nn.Linear; and
  `c_attn` fuses the q, k and v projections along its output dimension.
A setting one side cannot represent raises ConfigError naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from scaleforge.errors import ConfigError
from scaleforge.models.build import build
from scaleforge.models.config import TransformerConfig
from scaleforge.models.hf_config import from_hf_config, to_hf_config
from scaleforge.models.hf_mixtral import (
    DENSE_MLP_KEYS,
    from_mixtral_experts,
    fused_expert_layout,
    to_mixtral_experts,
)
from scaleforge.models.state_dict import check_state_dict_shapes

StateDict = dict[str, torch.Tensor]

# Per-layer names, ours -> Hugging Face, below `layers.<i>.` / `model.layers.<i>.`; the four
# llama-family architectures share them. A model has the biases (Qwen2) and the q/k norms
# (Qwen3) only when its config says so; names it lacks are skipped.
LLAMA_LAYER_KEYS = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
LLAMA_GLOBAL_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GPT-2 names that map one to one; the Conv1D ones (`CONV1D`) are transposed on the way.
GPT2_LAYER_KEYS = {
    "attention_norm.weight": "ln_1.weight",
    "attention_norm.bias": "ln_1.bias",
    "attention.wo.weight": "attn.c_proj.weight",
    "attention.wo.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight",
    "ffn_norm.bias": "ln_2.bias",
    "feed_forward.w1.weight": "mlp.c_fc.weight",
    "feed_forward.w1.bias": "mlp.c_fc.bias",
    "feed_forward.w2.weight": "mlp.c_proj.weight",
    "feed_forward.w2.bias": "mlp.c_proj.bias",
}
GPT2_GLOBAL_KEYS = {
    "tok_embeddings.weight": "transformer.wte.weight",
    "pos_embeddings.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
LINEAR_AS_CONV1D = ("attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight")
CONV1D = tuple(GPT2_LAYER_KEYS[name] for name in LINEAR_AS_CONV1D)
# Buffers some published checkpoints carry that no model computes from: GPT-2's causal
# masks and old Llama exports' RoPE frequencies.
IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def llama_layer_keys(cfg: TransformerConfig) -> dict[str, str]:
    """The Llama per-layer table; a Mixtral layer has experts (models/hf_mixtral.py)
    instead of the dense MLP."""
    dense = not cfg.moe.enabled
    return {k: v for k, v in LLAMA_LAYER_KEYS.items() if dense or k not in DENSE_MLP_KEYS}


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

    Tensors are shared, not copied, where the layout is the same; GPT-2's Conv1D weights are
    transposed copies. Raises ConfigError naming the first tensor whose name or shape does
    not fit `cfg`.
    """
    state = _with_tied_output(
        state_dict, "tok_embeddings.weight", "output.weight", cfg.tie_embeddings
    )
    check_state_dict_shapes(expected_state_dict(cfg), state, f"{cfg.family} model state dict")
    if cfg.family == "llama":
        return _rename(
            state,
            cfg.n_layers,
            LLAMA_GLOBAL_KEYS,
            llama_layer_keys(cfg),
            "layers.{}.",
            "model.layers.{}.",
        ) | to_mixtral_experts(state, cfg)
    hf = _rename(
        state,
        cfg.n_layers,
        GPT2_GLOBAL_KEYS,
        GPT2_LAYER_KEYS,
        "layers.{}.",
        "transformer.h.{}.",
    )
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.attention.", f"transformer.h.{i}.attn.c_attn."
        # Linear (out, in) -> Conv1D (in, out); q, k, v side by side along `out`.
        hf[theirs + "weight"] = torch.cat([state[ours + f"w{p}.weight"] for p in "qkv"], 0).t()
        hf[theirs + "bias"] = torch.cat([state[ours + f"w{p}.bias"] for p in "qkv"], 0)
        for suffix in CONV1D:
            hf[f"transformer.h.{i}.{suffix}"] = hf[f"transformer.h.{i}.{suffix}"].t()
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def from_hf_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], cfg: TransformerConfig
) -> StateDict:
    """A Hugging Face llama-family / GPT-2 state dict -> our single-process state dict for
    `cfg`.

    Accepts the published variants: GPT-2 files without the `transformer.` prefix, causal-mask
    and inv_freq buffers (dropped), tied models saved without `lm_head.weight`. Raises
    ConfigError naming the first tensor whose name or shape does not fit `cfg`.
    """
    state = {
        name: tensor
        for name, tensor in hf_state_dict.items()
        if not name.endswith(IGNORED_HF_SUFFIXES)
    }
    if cfg.family == "gpt":
        state = {
            name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}": t
            for name, t in state.items()
        }
    embed, output = to_hf_key(cfg, "tok_embeddings.weight"), to_hf_key(cfg, "output.weight")
    state = _with_tied_output(state, embed, output, cfg.tie_embeddings)
    state = fused_expert_layout(state, cfg)
    expected = to_hf_state_dict(expected_state_dict(cfg), cfg)
    check_state_dict_shapes(expected, state, "Hugging Face state dict")
    if cfg.family == "llama":
        ours = _rename(
            state,
            cfg.n_layers,
            _inverse(LLAMA_GLOBAL_KEYS),
            _inverse(llama_layer_keys(cfg)),
            "model.layers.{}.",
            "layers.{}.",
        ) | from_mixtral_experts(state, cfg)
    else:
        ours = _rename(
            state,
            cfg.n_layers,
            _inverse(GPT2_GLOBAL_KEYS),
            _inverse(GPT2_LAYER_KEYS),
            "transformer.h.{}.",
            "layers.{}.",
        )
        for i in range(cfg.n_layers):
            theirs, mine = f"transformer.h.{i}.attn.c_attn.", f"layers.{i}.attention."
            weights = state[theirs + "weight"].t().chunk(3, dim=0)  # 3 x (d, d), (out, in)
            biases = state[theirs + "bias"].chunk(3, dim=0)
            for p, weight, bias in zip("qkv", weights, biases, strict=True):
                ours[mine + f"w{p}.weight"], ours[mine + f"w{p}.bias"] = weight, bias
            for suffix in LINEAR_AS_CONV1D:
                ours[f"layers.{i}.{suffix}"] = ours[f"layers.{i}.{suffix}"].t()
    if cfg.tie_embeddings:
        ours["output.weight"] = ours["tok_embeddings.weight"]
    return {name: tensor.contiguous() for name, tensor in ours.items()}


def to_hf_key(cfg: TransformerConfig, name: str) -> str:
    """The Hugging Face name of our global (non-layer) tensor `name`."""
    return (LLAMA_GLOBAL_KEYS if cfg.family == "llama" else GPT2_GLOBAL_KEYS)[name]


def _inverse(mapping: Mapping[str, str]) -> dict[str, str]:
    return {theirs: ours for ours, theirs in mapping.items()}


def _rename(
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


def to_hf_model(
    state_dict: Mapping[str, torch.Tensor],
    cfg: TransformerConfig,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """The `transformers` model of `to_hf_config(cfg)` (LlamaForCausalLM, ...,
    GPT2LMHeadModel) in eval mode holding our weights in `dtype`."""
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
    """Read a local Hugging Face llama-family or GPT-2 directory (config.json + *.safetensors,
    sharded or not) as (our config, our state dict). Never unpickles and never downloads;
    tensors keep the file's dtype."""
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
