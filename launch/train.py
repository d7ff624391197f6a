"""`sf-train`: train a model from a Hydra config. Run it alone or under torchrun.

    sf-train +experiment=demo trainer.max_steps=200 run_dir=runs/mine

Under `--multirun` each job trains in its own `<hydra.sweep.dir>/<hydra.sweep.subdir>`
(`run_dir` is ignored there). Every finished run leaves `scaling.json` (N, D, C, losses).
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from scaleforge.core.config import register_configs, to_config
from scaleforge.core.errors import exit_on_config_error

register_configs()


def train(cfg: DictConfig) -> dict:
    """Validate, build and train; return the last logged metrics record."""
    from scaleforge.core.trainer import Trainer
    from scaleforge.scaling.run_record import write_run_record

    config = to_config(cfg)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        # every job of a sweep gets its own directory, <hydra.sweep.dir>/<hydra.sweep.subdir>;
        # a run_dir shared by all jobs would mix their metrics
        config.run_dir = HydraConfig.get().runtime.output_dir
    trainer = Trainer(config, Path(config.run_dir), world_size=int(os.environ.get("WORLD_SIZE", 1)))
    record = trainer.fit()
    write_run_record(config, trainer.run_dir)
    print(f"run directory: {trainer.run_dir.resolve()}", flush=True)
    return record


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    exit_on_config_error(train, cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
