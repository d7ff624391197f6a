"""Settings a run derives from what it already knows, before validation, so a user is not
asked for them: `data.vocab_size` from the shards' manifest or the tokenizer (when null),
and a warmup longer than the run clamped to the run (with a warning); and a warning when
bf16 would run on a CPU that emulates it (with the slowdown measured there)."""

from __future__ import annotations

from scaleforge.core.config import Config
from scaleforge.core.precision import cpu_bf16_warning
from scaleforge.data_pipeline.vocabulary import infer_data_vocab_size
from scaleforge.errors import ConfigError
from scaleforge.parallel.topology import resolve_device


def derive_settings(cfg: Config) -> list[str]:
    """Fill in `cfg`'s derivable settings in place; return the warnings to print (one line
    each). Problems (an unreadable data source, a missing device) are left for `validate`."""
    infer_data_vocab_size(cfg.data)
    warnings = []
    o, t = cfg.optim, cfg.trainer
    if o.warmup_steps > t.max_steps:
        warnings.append(
            f"warning: optim.warmup_steps={o.warmup_steps} exceeds trainer.max_steps="
            f"{t.max_steps}; warming up over all {t.max_steps} steps instead"
        )
        o.warmup_steps = t.max_steps
    try:
        device = resolve_device(t.device)
    except ConfigError:
        return warnings  # validate reports the missing device
    slow_bf16 = cpu_bf16_warning(t.precision, device)
    return warnings + ([slow_bf16] if slow_bf16 else [])
