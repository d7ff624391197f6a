"""Settings a run derives from what it already knows, before validation, so a user is not
asked for them: `data.vocab_size` from the shards' manifest or the tokenizer (when null),
and a warmup longer than the run clamped to the run (with a warning); and a warning when
bf16 would run on a CPU that emulates it (with the slowdown measured there)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from scaleforge.core.checkpoint.paths import find_checkpoint, resolve_resume
from scaleforge.core.config import Config
from scaleforge.core.precision import cpu_bf16_warning
from scaleforge.data_pipeline.vocabulary import infer_data_vocab_size
from scaleforge.errors import ConfigError
from scaleforge.parallel.run_setup import resolve_device


def derive_settings(cfg: Config) -> list[str]:
    """Fill in `cfg`'s derivable settings in place; return the warnings to print (one line
    each). Problems (an unreadable data source, a missing device) are left for `validate`."""
    infer_data_vocab_size(cfg.data)
    warnings = []
    evaluated = evaluated_checkpoint(cfg)
    if evaluated is not None:
        warnings.append(model_from_checkpoint(cfg, evaluated))
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


def evaluated_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint `trainer.eval_only=true` evaluates: the one resuming would load, else
    `trainer.init_from`'s; None when not evaluating or none is found (the trainer then
    names the problem)."""
    t = cfg.trainer
    if not t.eval_only:
        return None
    try:
        found = resolve_resume(t.resume, cfg.run_dir)
        if found is None and t.init_from:
            found = find_checkpoint(t.init_from, "trainer.init_from")
    except ConfigError:
        return None
    return found if found is not None and (found / "config.yaml").is_file() else None


def model_from_checkpoint(cfg: Config, checkpoint: Path) -> str:
    """Set `cfg.model` to the model saved with `checkpoint` (keeping this run's choice of
    attention kernel and fused kernels, which change no weight); return the line saying so."""
    from scaleforge.models.config import as_transformer_config

    model = as_transformer_config(OmegaConf.load(checkpoint / "config.yaml").model)
    model.attention, model.kernels = cfg.model.attention, cfg.model.kernels
    cfg.model = model
    return (f"eval-only: the model of {checkpoint} ({model.name}: {model.family}, "
            f"{model.n_layers} layers, d_model {model.d_model}), from its config.yaml")
