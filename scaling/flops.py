"""Training FLOPs per token three ways, and parameter counts both ways, for one model.

`core.flops.training_flops_per_token` is the exact matmul count (every projection, the
attention scores and values, the LM head; forward + backward). Beside it, the two
approximations scaling-law papers use:

- "6N" (Hoffmann et al. 2022): 6 FLOPs per parameter per token, N counting every
  parameter (embeddings included), attention scores ignored;
- "6N+attention" (Kaplan et al. 2020, eq. 2.2): 6 N_non-embedding + 6 n_layers seq_len
  d_attn, the attention term counted for every key (no causal halving).

For a Mixture-of-Experts model N is the active count (the experts a token passes through,
`num_params(active=True)`), what a token's FLOPs follow; `ModelSize` keeps both counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaleforge.core.flops import attended_keys, training_flops_per_token
from scaleforge.models.config import TransformerConfig
from scaleforge.models.param_count import num_params

FLOP_METHODS = ("exact", "6N", "6N+attention")


def six_n_flops_per_token(cfg: TransformerConfig) -> float:
    """Hoffmann's C/D = 6N, N = all parameters (embeddings included). FLOPs per token."""
    return 6.0 * num_params(cfg, embeddings=True, active=True)


def kaplan_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Kaplan's C/D = 6 N_non-embedding + 6 n_layers n_ctx d_attn. FLOPs per token; n_ctx is
    seq_len, or the sliding window when shorter."""
    d_attn = cfg.n_heads * cfg.head_size
    context = attended_keys(cfg, seq_len, causal=False)  # seq_len, or a sliding window
    active = num_params(cfg, embeddings=False, active=True)  # a MoE model's active ones
    return 6.0 * active + 6.0 * cfg.n_layers * context * d_attn


def flops_per_token(cfg: TransformerConfig, seq_len: int, method: str = "exact") -> float:
    """Training FLOPs per token of `cfg` at `seq_len` by `method` (one of FLOP_METHODS)."""
    if method == "exact":
        return training_flops_per_token(cfg, seq_len, causal=True)
    if method == "6N":
        return six_n_flops_per_token(cfg)
    if method == "6N+attention":
        return kaplan_flops_per_token(cfg, seq_len)
    raise ValueError(f"flops method {method!r} is unknown; use one of {FLOP_METHODS}")


@dataclass(frozen=True)
class ModelSize:
    """Sizes of one model: parameters with and without embeddings (every expert), the
    active non-embedding parameters (a dense model: all of them), FLOPs per token 3 ways."""

    params: int
    non_embedding_params: int
    active_non_embedding_params: int
    flops_per_token: float
    flops_per_token_6n: float
    flops_per_token_6n_attention: float


def model_size(cfg: TransformerConfig, seq_len: int) -> ModelSize:
    """Every count of `cfg` a sweep records (parameters, FLOPs per token at `seq_len`)."""
    return ModelSize(
        params=num_params(cfg, embeddings=True),
        non_embedding_params=num_params(cfg, embeddings=False),
        active_non_embedding_params=num_params(cfg, embeddings=False, active=True),
        flops_per_token=flops_per_token(cfg, seq_len, "exact"),
        flops_per_token_6n=flops_per_token(cfg, seq_len, "6N"),
        flops_per_token_6n_attention=flops_per_token(cfg, seq_len, "6N+attention"),
    )
