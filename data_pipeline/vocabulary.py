"""The tokenizer and vocabulary size a data config implies, read from what preprocessing
recorded, so `data.vocab_size` need not be given in shards and streaming modes, and a
checkpoint's text can be encoded and decoded as its training data was."""

from __future__ import annotations

from pathlib import Path

from scaleforge.data_pipeline.chat_template import ChatTemplate, load_template
from scaleforge.data_pipeline.config import DataConfig
from scaleforge.data_pipeline.conversation_shards import shards_template
from scaleforge.data_pipeline.manifest import load_manifest, load_shard_tokenizer
from scaleforge.data_pipeline.tokenizer import Tokenizer
from scaleforge.errors import ConfigError


def data_vocab_size(data_cfg: DataConfig) -> int:
    """The number of token ids of the data's tokenizer: in shards mode from the (first)
    source's manifest, in streaming mode from `data.tokenizer`; in corpus mode, which trains
    its own tokenizer, `data.vocab_size`. ConfigError naming the setting when the source is
    missing or unreadable, or corpus mode has no `data.vocab_size`."""
    if data_cfg.mode == "shards":
        if data_cfg.path:
            return int(load_manifest(Path(data_cfg.path))["tokenizer"]["vocab_size"])
        if data_cfg.blend:
            first = data_cfg.blend[0].path
            manifest = load_manifest(Path(first), setting="data.blend.0.path")
            return int(manifest["tokenizer"]["vocab_size"])
        raise missing_shard_source()
    if data_cfg.mode == "streaming":
        if not data_cfg.tokenizer:
            raise ConfigError("data.mode=streaming needs data.tokenizer (a tokenizer "
                              "directory or file written by sf-preprocess tokenizer)")
        return Tokenizer.load(data_cfg.tokenizer).vocab_size
    if data_cfg.vocab_size is None:
        raise ConfigError("data.vocab_size=null: corpus mode trains its own tokenizer and "
                          "needs its size; set data.vocab_size")
    return data_cfg.vocab_size


def infer_data_vocab_size(data_cfg: DataConfig) -> None:
    """Set `data.vocab_size` from the data when it is null; leave it (and any problem
    reading the data, which validation reports) otherwise."""
    if data_cfg.vocab_size is None:
        try:
            data_cfg.vocab_size = data_vocab_size(data_cfg)
        except ConfigError:
            pass


def missing_shard_source() -> ConfigError:
    """The error for data.mode=shards without data.path or data.blend."""
    return ConfigError(
        "data.mode=shards needs data.path=DIR (a directory written by sf-preprocess shards) "
        "or data.blend (a list of {path, weight}); see configs/data/blend.yaml"
    )


def data_tokenizer(data_cfg: DataConfig) -> Tokenizer:
    """The tokenizer the data of `data_cfg` was tokenized with: the (first) shard
    directory's, `data.tokenizer` when streaming, or corpus mode's cached one (a ConfigError
    when the cache is missing: it is not rebuilt)."""
    if data_cfg.mode == "streaming":
        data_vocab_size(data_cfg)  # names a missing data.tokenizer
        return Tokenizer.load(str(data_cfg.tokenizer))
    if data_cfg.mode == "corpus":
        from scaleforge.data_pipeline.prepare import prepare

        directory = prepare(data_cfg, build=False)
    elif data_cfg.path or data_cfg.blend:
        directory = Path(data_cfg.path or data_cfg.blend[0].path)
    else:
        raise missing_shard_source()
    return load_shard_tokenizer(directory, load_manifest(directory))


def data_chat_template(data_cfg: DataConfig, tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template of a run's data: the one its conversation shards were rendered with
    (sf-preprocess sft), else the tokenizer's own or the default (`template=auto`)."""
    if data_cfg.mode == "shards" and data_cfg.path:
        template = shards_template(load_manifest(Path(data_cfg.path)))
        if template is not None:
            return template
    return load_template("auto", tokenizer.path)
