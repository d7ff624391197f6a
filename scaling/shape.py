"""The shape rule: a target non-embedding parameter count -> (n_layers, d_model, n_heads).

Rule (documented in the README):
- heads are `head_dim_for(d_model)` wide (16 below d_model 256, 32 below 512, 64 below
  4096, 128 above, so small models still get several heads; never under MIN_HEAD_DIM) and
  d_model is a multiple of the head width and at least MIN_D_MODEL (two heads of 16):
  narrower models are the one-head, 16-wide shapes that trained 0.3-0.7 nats worse than
  their neighbours in the CPU check (bench/RESULTS.md, issue 29); attention is multi-head;
- the aspect ratio d_model / n_layers stays within ASPECT_RANGE = [20, 200]: Kaplan et al.
  (2020, "Scaling Laws for Neural Language Models", sec. 3.1 and fig. 5 middle) measured the
  loss at a fixed non-embedding N to stay within a few percent of its best over aspect ratios
  of about 20 to 200 (the flat region; it widens at larger N), and the Chinchilla models
  (Hoffmann et al. 2022, table A9) sit at 64 to 128. A shape outside it is never planned;
  `aspect_ratio` (the preferred value) must itself lie inside;
- the MLP width (`ffn_hidden`, a multiple of 16) is set so the count lands on the target,
  and must stay within [2, 4] x d_model (Llama's own ratio is 8/3);
- among the in-bounds shapes within `tolerance` (5%) of the target, the winner minimises
  |log(aspect / aspect_ratio)| + |log(ffn_hidden / (8/3 d_model))|. Where no in-bounds shape
  comes that close (small models: d_model moves in steps of a head, n_layers in ones), the
  in-bounds shape with the nearest count wins; the planner records and prints every shape's
  real N and aspect ratio, which is what the fit reads.
Targets from about 1e4 non-embedding parameters upward are reachable (one layer of width 32).
"""

from __future__ import annotations

import math
from dataclasses import replace

from scaleforge.errors import ConfigError
from scaleforge.models.config import TransformerConfig
from scaleforge.models.param_count import num_params

DEFAULT_ASPECT_RATIO = 64.0
ASPECT_RANGE = (20.0, 200.0)  # d_model / n_layers (Kaplan et al. 2020, fig. 5; see above)
MIN_HEAD_DIM = 16
MIN_D_MODEL = 32
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
    """Valid d_model values (multiples of their head width, at least MIN_D_MODEL)
    bracketing `approximate`."""
    out = set()
    for step in (16, 32, 64, 128):
        low = max(step, int(approximate // step) * step)
        for d in (low, low + step):
            if head_dim_for(d) == step and d >= MIN_D_MODEL:
                out.add(d)
    return sorted(out)


def aspect_of(cfg: TransformerConfig) -> float:
    """d_model / n_layers of `cfg`."""
    return cfg.d_model / cfg.n_layers


def within_rule(cfg: TransformerConfig) -> bool:
    """Whether `cfg`'s shape keeps the rule's bounds: aspect ratio in ASPECT_RANGE, head
    width at least MIN_HEAD_DIM, d_model at least MIN_D_MODEL."""
    low, high = ASPECT_RANGE
    return (low <= aspect_of(cfg) <= high and cfg.head_size >= MIN_HEAD_DIM
            and cfg.d_model >= MIN_D_MODEL)


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
    (relative) of `target` where an in-bounds shape comes that close, else the in-bounds
    shape nearest it, shaped by the module's rule. Raises ConfigError for an `aspect_ratio`
    outside ASPECT_RANGE or a target below the smallest in-bounds shape."""
    if not target > 0:
        raise ConfigError(f"target non-embedding parameter count {target} must be positive")
    low, high = ASPECT_RANGE
    if not low <= aspect_ratio <= high:
        raise ConfigError(
            f"aspect_ratio={aspect_ratio:g} is outside the shape rule's range [{low:g}, "
            f"{high:g}] (d_model / n_layers where Kaplan et al. 2020 found the loss flat); "
            f"use a value inside it, e.g. {DEFAULT_ASPECT_RATIO:g}"
        )
    close: tuple[float, TransformerConfig] | None = None
    nearest: tuple[float, TransformerConfig] | None = None
    for n_layers in range(1, MAX_LAYERS + 1):
        # a block holds about 12 d_model^2 parameters (4 d^2 attention, 8 d^2 MLP)
        for d_model in _width_candidates(math.sqrt(target / n_layers / 12)):
            cfg = shaped(base, n_layers, d_model, _ffn_for(target, base, n_layers, d_model))
            if not within_rule(cfg):
                continue
            miss = abs(math.log(num_params(cfg, embeddings=False) / target))
            if nearest is None or miss < nearest[0]:
                nearest = (miss, cfg)
            if miss > math.log1p(tolerance):
                continue
            score = (abs(math.log(aspect_of(cfg) / aspect_ratio))
                     + abs(math.log(cfg.mlp_hidden / (LLAMA_FFN_RATIO * d_model))))
            if close is None or score < close[0]:
                close = (score, cfg)
    smallest = num_params(shaped(base, 1, MIN_D_MODEL, 2 * MIN_D_MODEL), embeddings=False)
    if close is None and (nearest is None or target < smallest * (1 - tolerance)):
        raise ConfigError(
            f"no model shape within the rule's bounds has {target:,.0f} non-embedding "
            f"parameters (the smallest, one layer of width {MIN_D_MODEL}, has {smallest:,}): "
            "raise the target, or the compute budget that produced it"
        )
    chosen = close or nearest
    assert chosen is not None
    return chosen[1]
