"""Parameter counts: closed form from the config, and by walking a built module.

Two conventions are in use. Kaplan et al. (2020) fit scaling laws to the non-embedding
count N (no token embedding, position embedding or unembedding matrix); Hoffmann et al.
(2022, Chinchilla) count every parameter. `embeddings=True` gives the latter,
`embeddings=False` the former. A tied unembedding is the token embedding and counts once.
A Mixture-of-Experts model (models/moe.py) has a total count (every expert) and an active
one (`active=True`: the top_k routed and the shared experts a token passes through, and the
router), which is what a token's FLOPs follow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from omegaconf import DictConfig

from scaleforge.models.config import TransformerConfig, as_transformer_config
from scaleforge.models.family import family_spec
from scaleforge.models.moe import expert_hidden

EMBEDDING_MODULES = ("tok_embeddings", "pos_embeddings", "output")


def attention_params(cfg: TransformerConfig, biases: bool = True) -> int:
    """Parameters of one layer's attention, as its family counts them (e.g. wq, wk, wv, wo,
    their biases and the q/k norms); biases=False gives the weight matrices alone (the ones
    that take part in matmuls)."""
    return family_spec(cfg.family).counts.attention_params(cfg, biases)


def mlp_params(cfg: TransformerConfig, biases: bool = True) -> int:
    """Parameters of one layer's dense MLP (llama's SwiGLU w1, w3, w2; gpt's w1, w2 and
    their biases unless biases=False)."""
    return family_spec(cfg.family).counts.mlp_params(cfg, biases)


def ffn_params(cfg: TransformerConfig, layer: int, active: bool = False,
               biases: bool = True) -> int:
    """Parameters of layer `layer`'s feed-forward: its MLP (`mlp_params`), or for a MoE
    layer the router and the experts, all of them or (active=True) the top_k routed ones,
    plus the shared experts."""
    moe = cfg.moe
    if not moe.is_moe_layer(layer):
        return mlp_params(cfg, biases)
    expert = 3 * cfg.d_model * expert_hidden(cfg)
    routed = moe.top_k if active else moe.num_experts
    return cfg.d_model * moe.num_experts + (routed + moe.shared_experts) * expert


def num_params(
    cfg: TransformerConfig | DictConfig | Mapping[str, Any], embeddings: bool = True,
    active: bool = False,
) -> int:
    """Number of parameters of the model `cfg` describes, without building it.

    embeddings=False leaves out the token embedding, the learned position embedding (gpt)
    and the output (unembedding) matrix: Kaplan's non-embedding N. Norm weights and biases
    are included in both counts. active=True counts a MoE model's active parameters.
    """
    cfg = as_transformer_config(cfg)
    d, family_counts = cfg.d_model, family_spec(cfg.family).counts
    norm = family_counts.norm_params(cfg)  # e.g. RMSNorm's weight, LayerNorm's and its bias
    layers = sum(attention_params(cfg) + ffn_params(cfg, i, active) + 2 * norm
                 for i in range(cfg.n_layers))
    body = layers + norm  # layers and the final norm
    if not embeddings:
        return body
    token = cfg.vocab_rows * d
    position = family_counts.position_params(cfg)  # learned positions (gpt)
    unembedding = 0 if cfg.tie_embeddings else cfg.vocab_rows * d
    return body + token + position + unembedding


def count_parameters(model: nn.Module, embeddings: bool = True) -> int:
    """Number of distinct parameters of a built model (meta tensors count too).

    A tied weight counts once. embeddings=False leaves out the parameters of the top-level
    `tok_embeddings`, `pos_embeddings` and `output` modules, matching `num_params`.
    """
    params = {id(p): p for p in model.parameters()}  # parameters() already skips repeats
    if not embeddings:
        for name in EMBEDDING_MODULES:
            module = getattr(model, name, None)
            if module is not None:
                for p in module.parameters():
                    params.pop(id(p), None)
    return sum(p.numel() for p in params.values())


def describe_parameters(cfg: TransformerConfig, model: nn.Module | None = None) -> str:
    """e.g. '1.31M parameters (0.79M non-embedding)', with ', 1.32M active' for a MoE
    model: counted on `model` (DTensor parameters report their full size) or, without it
    (a pipeline rank holds only its stages), from the config."""
    if model is None:
        params, non_embedding = num_params(cfg), num_params(cfg, False)
    else:
        params, non_embedding = count_parameters(model), count_parameters(model, False)
    line = f"{params / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding"
    if cfg.moe.enabled:
        line += f", {num_params(cfg, active=True) / 1e6:.2f}M active"
    return line + ")"
