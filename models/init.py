"""Weight initialisation one parameter at a time, each from its own random stream.

Parameter `name` (its single-process FQN, e.g. `layers.3.attention.wq.weight`) is drawn from
a generator seeded by `parameter_seed(seed, name)`, a hash of the run's weight seed and the
name. So a parameter's values depend only on (seed, name, shape, device type): not on the
order in which modules are visited, nor on which process draws it, nor on what else that
process draws. A sharded start-up (parallel/parallelize.py) uses this: each rank draws, one
at a time, the full parameters it holds a shard of, keeps its shard and frees the rest, and
ends up with exactly the weights one process draws (bitwise; the draw runs on the target
device, so CPU and CUDA runs start from different, equally distributed, weights).

The rules (`InitRule`): Linear and embedding weights ~ N(0, init_std); the residual output
projections (`wo`, `w2`) ~ N(0, init_std / sqrt(2 * n_layers)) (GPT-2); biases 0; norm
weights 1. Stacked expert weights (models/moe.py) draw like Linear weights, w2 as a
residual projection; MoE buffers (expert bias, statistics) start at 0. A tied LM head is
the token embedding and takes its draw. Under muP (`model.mup.base_width`) every hidden
weight's std is further scaled by (base_width / d_model)^1/2 (models/mup.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from scaleforge.models.config import TransformerConfig
from scaleforge.models.lora import LoRALinear, adapter_std, apply_lora
from scaleforge.models.moe import EXPERT_WEIGHTS, Experts, reset_moe_state
from scaleforge.models.mup import init_std_scale
from scaleforge.models.transformer import RESIDUAL_PROJECTIONS, RMSNorm, Transformer

# Prefixes that module wrappers add to parameter names (activation checkpointing's wrapper,
# torch.compile's OptimizedModule); the canonical name has none of them.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class InitRule:
    """How one parameter is filled: `kind` normal (mean 0, `std`), ones or zeros."""

    kind: str
    std: float = 0.0


def canonical_name(name: str) -> str:
    """`name` without the prefixes module wrappers add: the single-process FQN."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of parameter `name` under the run's weight `seed`: 63 bits of
    sha256(seed, name), the same in every process and Python run."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_from_global_rng() -> int:
    """A weight seed drawn from torch's global CPU generator: what `torch.manual_seed(s)`
    before a build makes reproducible (one draw, no device involved)."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


def init_rules(cfg: TransformerConfig) -> dict[str, InitRule]:
    """The rule of every parameter of the full model, keyed by canonical name (a tied LM
    head appears once, as `tok_embeddings.weight`). Built on the meta device: no memory."""
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_lora(model, cfg.lora)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    rules: dict[str, InitRule] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual = module_name.endswith(RESIDUAL_PROJECTIONS)
            rules.setdefault(f"{prefix}weight",
                             InitRule("normal", residual_std if residual else cfg.init_std))
        if isinstance(module, Experts):
            for weight in EXPERT_WEIGHTS:
                std = residual_std if weight == "w2" else cfg.init_std
                rules[f"{prefix}{weight}"] = InitRule("normal", std)
        if isinstance(module, LoRALinear):  # B at zero: the adapted model starts as the base
            rules[f"{prefix}lora_a"] = InitRule("normal", adapter_std(module.in_features))
            rules[f"{prefix}lora_b"] = InitRule("zeros")
        if isinstance(module, (RMSNorm, nn.LayerNorm)):
            rules[f"{prefix}weight"] = InitRule("ones")
        if getattr(module, "bias", None) is not None:
            rules[f"{prefix}bias"] = InitRule("zeros")
    if cfg.tie_embeddings:
        rules.pop("output.weight", None)
    if cfg.mup.enabled:
        shapes = {name: param.ndim for name, param in model.named_parameters()}
        rules = {name: InitRule(rule.kind, rule.std * init_std_scale(cfg, name, shapes[name]))
                 for name, rule in rules.items()}
    return rules


def rule_key(cfg: TransformerConfig, name: str) -> str:
    """The rules' key of parameter `name` (wrapper prefixes removed; a tied head's weight is
    the token embedding's)."""
    name = canonical_name(name)
    if cfg.tie_embeddings and name == "output.weight":
        return "tok_embeddings.weight"
    return name


@torch.no_grad()
def fill_parameter(tensor: torch.Tensor, rule: InitRule, seed: int, key: str) -> None:
    """Fill the full (unsharded) `tensor` of parameter `key` by `rule`, drawing a normal
    from the generator of (seed, key) on the tensor's device."""
    if rule.kind == "ones":
        tensor.fill_(1.0)
    elif rule.kind == "zeros":
        tensor.zero_()
    else:
        generator = torch.Generator(device=tensor.device)
        generator.manual_seed(parameter_seed(seed, key))
        tensor.normal_(mean=0.0, std=rule.std, generator=generator)


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Fill every parameter of a materialised, unsharded `model` (or pipeline stage) by its
    rule from its own generator, re-tie a tied LM head, and recompute the RoPE tables."""
    cfg = model.cfg
    output, embeddings = model.output, model.tok_embeddings
    if cfg.tie_embeddings and output is not None and embeddings is not None:
        # to_empty gives each module its own fresh tensor, which unties the two.
        output.weight = embeddings.weight
    rules = init_rules(cfg)
    for name, param in model.named_parameters():  # a shared (tied) parameter once
        key = rule_key(cfg, name)
        fill_parameter(param, rules[key], seed, key)
    reset_buffers(model)


def reset_buffers(model: Transformer) -> None:
    """Set the buffers `to_empty` leaves undefined: RoPE tables and MoE state."""
    reset_rope_tables(model)
    reset_moe_state(model)


@torch.no_grad()
def reset_rope_tables(model: Transformer) -> None:
    """Recompute the RoPE buffers (not saved in checkpoints) from the config in place."""
    rope_cos, rope_sin = model.rope_cos, model.rope_sin  # None without RoPE (gpt)
    if isinstance(rope_cos, torch.Tensor) and isinstance(rope_sin, torch.Tensor):
        cos, sin = model._rope_tables(device=rope_cos.device)
        rope_cos.copy_(cos)
        rope_sin.copy_(sin)
