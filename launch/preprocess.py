"""`sf-preprocess`: prepare a config's data (tokenizer and token files) without training.

    sf-preprocess data.corpus='/data/books/**/*.txt' data.vocab_size=8192

Takes the same overrides as sf-train; the result lands in `data.cache_dir`, where a later
sf-train run with the same data settings finds and reuses it.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from scaleforge.core.config import register_configs, to_config
from scaleforge.core.errors import exit_on_config_error

register_configs()


def preprocess(cfg: DictConfig) -> None:
    """Prepare (or find already prepared) the data of `cfg.data` and say where it is."""
    from scaleforge.data_pipeline.prepare import prepare

    prepared = prepare(to_config(cfg).data)
    print(f"tokenizer: {prepared.tokenizer_path}", flush=True)
    print(f"train tokens: {prepared.train_tokens_path} ({prepared.train_tokens:,})", flush=True)
    print(f"val tokens: {prepared.val_tokens_path} ({prepared.val_tokens:,})", flush=True)


@hydra.main(version_base=None, config_path="../configs", config_name="preprocess")
def _hydra_main(cfg: DictConfig) -> None:
    exit_on_config_error(preprocess, cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
