"""The shape rule: a target non-embedding parameter count -> (n_layers, d_model, n_heads).

Rule (documented in the README):
- heads are `head_dim_for(d_model)` wide (16 below d_model 256, 32 below 512, 64 below
  4096, 128 above, so small models still get several heads) and d_model is a multiple of
  the head width; attention is multi-head (no grouped-query);
- the MLP width (`ffn_hidden`, a multiple of 16) is set so the count lands on the target,
  and must stay within [2, 4] x d_model (Llama's own ratio is 8/3);
- among all (n_layers, d_model, ffn_hidden) within `tolerance` (5%) of the target, the
  winner minimises |log(aspect / aspect_ratio)| + |log(ffn_hidden / (8/3 d_model))|, where
  aspect = d_model / n_layers.
The default aspect ratio 64 sits in the flat optimum Kaplan et al. (2020, fig. 5) measured
and matches the mid-sized Chinchilla models (Hoffmann et al. 2022, table A9: 64 to 128).
Targets from about 2e4 non-embedding parameters upward are reachable.
"""

from __future__ import annotations

import math
from dataclasses import replace

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.param_count import num_params

DEFAULT_ASPECT_RATIO = 64.0
MAX_LAYERS = 256
FFN_STEP = 16
FFN_RANGE = (2.0, 4.0)  # ffn_hidden / d_model
LLAMA_FFN_RATIO = 8 / 3


def head_dim_for(d_model: int) -> int:
    """Head width of the rule: 16 below d_model 256, 32 below 512, 64 below 4096, else 128."""
    if d_model < 256:
        return 16
    if d_model < 512:
        return 32
    return 64 if d_model < 4096 else 128


def _width_candidates(approximate: float) -> list[int]:
    """Valid d_model values (multiples of their head width) bracketing `approximate`."""
    out = set()
    for step in (16, 32, 64, 128):
        low = max(step, int(approximate // step) * step)
        for d in (low, low + step):
            if head_dim_for(d) == step:
                out.add(d)
    return sorted(out)


def shaped(base: TransformerConfig, n_layers: int, d_model: int, ffn_hidden: int) -> \
        TransformerConfig:
    """`base` with `n_layers` blocks of width `d_model`, MHA heads of `head_dim_for(d_model)`
    and an MLP of `ffn_hidden` units."""
    return replace(base, n_layers=n_layers, d_model=d_model,
                   n_heads=d_model // head_dim_for(d_model), n_kv_heads=None,
                   ffn_hidden=ffn_hidden)


def _ffn_for(target: float, base: TransformerConfig, n_layers: int, d_model: int) -> int:
    """The multiple of FFN_STEP that brings the count closest to `target` (the count is
    linear in ffn_hidden), clamped to FFN_RANGE x d_model."""
    at_zero = num_params(shaped(base, n_layers, d_model, 0), embeddings=False)
    per_unit = num_params(shaped(base, n_layers, d_model, FFN_STEP), embeddings=False) - at_zero
    steps = round((target - at_zero) / per_unit)
    low, high = (math.ceil(r * d_model / FFN_STEP) for r in FFN_RANGE)
    return FFN_STEP * min(max(steps, low), high)


def shape_for_params(
    target: float,
    base: TransformerConfig,
    aspect_ratio: float = DEFAULT_ASPECT_RATIO,
    tolerance: float = 0.05,
) -> TransformerConfig:
    """A config like `base` whose non-embedding parameter count is within `tolerance`
    (relative) of `target`, shaped by the module's rule. Raises ConfigError when no shape
    comes that close."""
    if not target > 0:
        raise ConfigError(f"target non-embedding parameter count {target} must be positive")
    best: tuple[float, TransformerConfig] | None = None
    for n_layers in range(1, MAX_LAYERS + 1):
        # a block holds about 12 d_model^2 parameters (4 d^2 attention, 8 d^2 MLP)
        for d_model in _width_candidates(math.sqrt(target / n_layers / 12)):
            cfg = shaped(base, n_layers, d_model, _ffn_for(target, base, n_layers, d_model))
            if abs(num_params(cfg, embeddings=False) / target - 1) > tolerance:
                continue
            score = (abs(math.log(d_model / n_layers / aspect_ratio))
                     + abs(math.log(cfg.mlp_hidden / (LLAMA_FFN_RATIO * d_model))))
            if best is None or score < best[0]:
                best = (score, cfg)
    if best is None:
        raise ConfigError(
            f"no model shape has {target:,.0f} non-embedding parameters within {tolerance:.0%} "
            "(the rule reaches about 2e4 and up): raise the target, or the compute budget "
            "that produced it"
        )
    return best[1]
