"""Parameter counts: closed form from the config, and by walking a built module.

Two conventions are in use. Kaplan et al. (2020) fit scaling laws to the non-embedding
count N (no token embedding, position embedding or unembedding matrix); Hoffmann et al.
(2022, Chinchilla) count every parameter. `embeddings=True` gives the latter,
`embeddings=False` the former. A tied unembedding is the token embedding and counts once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from omegaconf import DictConfig

from scaleforge.models.config import TransformerConfig, as_transformer_config

EMBEDDING_MODULES = ("tok_embeddings", "pos_embeddings", "output")


def num_params(
    cfg: TransformerConfig | DictConfig | Mapping[str, Any], embeddings: bool = True
) -> int:
    """Number of parameters of the model `cfg` describes, without building it.

    embeddings=False leaves out the token embedding, the learned position embedding (gpt)
    and the output (unembedding) matrix: Kaplan's non-embedding N. Norm weights and biases
    are included in both counts.
    """
    cfg = as_transformer_config(cfg)
    d, q_width, kv_width = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    attention = d * q_width + 2 * d * kv_width + q_width * d  # wq, wk, wv, wo
    if cfg.family == "llama":
        mlp = 3 * d * cfg.mlp_hidden  # w1, w3, w2
        norm = d  # RMSNorm weight
    else:
        attention += q_width + 2 * kv_width + d  # biases
        mlp = 2 * d * cfg.mlp_hidden + cfg.mlp_hidden + d  # w1, w2 and their biases
        norm = 2 * d  # LayerNorm weight and bias
    body = cfg.n_layers * (attention + mlp + 2 * norm) + norm  # layers and the final norm
    if not embeddings:
        return body
    token = cfg.vocab_size * d
    position = cfg.max_seq_len * d if cfg.family == "gpt" else 0
    unembedding = 0 if cfg.tie_embeddings else cfg.vocab_size * d
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
