"""Learning-rate schedules: linear warmup, then cosine, linear or warmup-stable-decay.

The schedule is a pure function of the optimizer step, so resuming needs only the step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from scaleforge.core.optimizer import OptimConfig


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of `optim.lr` for optimizer step `step` (0-based) of a `max_steps` run.

    Warmup rises linearly to 1 over `warmup_steps` (step 0 gets 1/warmup_steps). After it,
    the last step (max_steps - 1) lands exactly on `min_lr_ratio`:
    cosine and linear decay over all remaining steps; wsd holds 1 and decays linearly over
    the final `decay_fraction` of them; constant stays at 1.
    """
    warmup = optim.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "constant":
        return 1.0
    decay_steps = max_steps - warmup
    progress = min(1.0, (step + 1 - warmup) / decay_steps)
    low = optim.min_lr_ratio
    if optim.schedule == "cosine":
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
    if optim.schedule == "linear":
        return 1 - (1 - low) * progress
    if optim.schedule == "wsd":
        stable = 1 - optim.decay_fraction
        if progress <= stable:
            return 1.0
        return 1 - (1 - low) * (progress - stable) / optim.decay_fraction
    raise ValueError(f"optim.schedule={optim.schedule!r} is unknown")


def set_lr(optimizer: Optimizer, step: int, optim: OptimConfig, max_steps: int) -> float:
    """Write the scheduled learning rate of `step` into every param group, times the group's
    "lr_scale" where it has one (muP's per-layer factors, core/optimizer.py); return the
    unscaled one."""
    lr = optim.lr * lr_factor(step, optim, max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
