"""Settings a run derives from what it already knows, before validation, so a user is not
asked for them: `data.vocab_size` from the shards' manifest or the tokenizer (when null),
and a warmup longer than the run clamped to the run (with a warning)."""

from __future__ import annotations

from scaleforge.core.config import Config
from scaleforge.data_pipeline.vocabulary import infer_data_vocab_size


def derive_settings(cfg: Config) -> list[str]:
    """Fill in `cfg`'s derivable settings in place; return the warnings to print (one line
    each). Problems (an unreadable data source) are left for `validate` to report."""
    infer_data_vocab_size(cfg.data)
    warnings = []
    o, t = cfg.optim, cfg.trainer
    if o.warmup_steps > t.max_steps:
        warnings.append(
            f"warning: optim.warmup_steps={o.warmup_steps} exceeds trainer.max_steps="
            f"{t.max_steps}; warming up over all {t.max_steps} steps instead"
        )
        o.warmup_steps = t.max_steps
    return warnings
