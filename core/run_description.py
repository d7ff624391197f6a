"""The lines a run starts with: what is trained where, and how the work is laid out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from scaleforge.data_pipeline.manifest import load_manifest
from scaleforge.models.param_count import describe_parameters
from scaleforge.parallel.float8 import describe_float8, gathers_weights_in_float8

if TYPE_CHECKING:
    from scaleforge.core.config import Config
    from scaleforge.core.trainer import Trainer


def describe_run(trainer: Trainer) -> str:
    """The run's first line: model, parameters, device, precision, batch, run directory."""
    cfg = trainer.cfg
    params = describe_parameters(cfg.model, trainer.train_module.whole_model)
    return (
        f"model {cfg.model.name} ({cfg.model.family}): {params} | device {trainer.device} | "
        f"precision {cfg.trainer.precision} | {cfg.trainer.global_batch_tokens:,} tokens/"
        f"step = {_micro_batches(trainer.micro_batches)} x {cfg.trainer.micro_batch_size} x "
        f"{cfg.data.seq_len} | {trainer.throughput.describe()} | "
        f"run dir {trainer.run_dir}"
    )


def describe_layout(trainer: Trainer) -> str:
    """The layout's line: topology, micro-batches per rank, the pipeline's bubble."""
    line = f"parallel: {trainer.topology.describe()} | per data-parallel rank " \
           f"{_micro_batches(trainer.micro_batches)}"
    described = trainer.train_module.describe()
    return f"{line} | {described}" if described else line


def describe_fp8(trainer: Trainer) -> str | None:
    """The fp8 line (parallel/float8.py): torchao's version, the recipe, the layers in float8
    and those kept in high precision on this rank; None with trainer.fp8=none."""
    recipe = trainer.cfg.trainer.fp8
    if recipe == "none":
        return None
    model = trainer.train_module.whole_model or trainer.model_parts
    return describe_float8(model, recipe, gathers_weights_in_float8(recipe, trainer.topology))


def _micro_batches(count: int) -> str:
    return f"{count} micro-batch{'es' if count != 1 else ''}"


def describe_config_changes(saved: Path, cfg: Config) -> str | None:
    """One line naming each setting whose value differs between the config saved at `saved`
    (a resumed checkpoint's config.yaml) and `cfg`; None when none does or nothing is saved."""
    if not saved.is_file():
        return None
    before = _flat(OmegaConf.to_container(OmegaConf.load(saved)))
    after = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    changed = [f"{key} {before.get(key)} -> {after.get(key)}"
               for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    return f"config changed since the checkpoint: {', '.join(changed)}" if changed else None


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    """A nested config as {dotted key: value}."""
    if isinstance(tree, dict):
        return {key: value for name, subtree in tree.items()
                for key, value in _flat(subtree, f"{prefix}{name}.").items()}
    return {prefix[:-1]: tree}


def describe_data(cfg: Config, directories: tuple[Path, ...]) -> str | None:
    """One line: each shard source's directory, training tokens, weight and the epochs of
    it this run reads (`trainer.max_steps` x `trainer.global_batch_tokens` x its share);
    None for streaming data, which has no counts up front."""
    if not directories:
        return None
    weights = ([1.0] if cfg.data.mode == "corpus" or cfg.data.path
               else [source.weight for source in cfg.data.blend])
    total_weight = sum(weights)
    run_tokens = cfg.trainer.max_steps * cfg.trainer.global_batch_tokens
    parts = []
    for directory, weight in zip(directories, weights, strict=True):
        tokens = load_manifest(directory)["splits"]["train"]["tokens"]
        share = weight / total_weight
        parts.append(f"{directory} ({tokens:,} tokens, weight {share:.2f}, "
                     f"{run_tokens * share / max(tokens, 1):.2f} epochs)")
    return f"data: {'; '.join(parts)}; this run reads {run_tokens:,} tokens"
