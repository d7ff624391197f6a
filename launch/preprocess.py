"""`sf-preprocess`: train a tokenizer, or tokenize a corpus into shards, with key=value args.

    sf-preprocess tokenizer input='raw/**/*.jsonl.gz' vocab_size=32000 out=tok/
    sf-preprocess shards input='raw/**/*.jsonl.gz' tokenizer=tok/ out=shards/web workers=16
    sf-preprocess prepare data.corpus='books/**/*.txt'   # a config's corpus-mode data

`tokenizer` trains sentencepiece (model_type=bpe or unigram, byte fallback, UNK/BOS/EOS/PAD
= 0/1/2/3) on a sample of the input. `shards` takes a tokenizer directory or a Hugging Face
tokenizer.json; rerun it after an interruption and it resumes. `prepare` takes the same
Hydra overrides as sf-train and builds the corpus mode's cache. Training then reads the
shards with `sf-train data=shards data.path=shards/web`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scaleforge.errors import ConfigError, exit_on_config_error

COMMANDS = ("tokenizer", "shards", "prepare")


@dataclass
class TokenizerJob:
    """The settings of `sf-preprocess tokenizer` (each is a key=value argument)."""

    input: str
    vocab_size: int
    out: str
    model_type: str = "bpe"
    text_field: str = "text"
    # Bytes of text read from the start of the input to train on (the tokenizer then uses
    # at most 300,000 evenly spaced lines of it).
    sample_bytes: int = 200_000_000


def train_tokenizer(job: TokenizerJob) -> None:
    """Train a sentencepiece tokenizer on a sample of `job.input` into `job.out`."""
    from scaleforge.data_pipeline.sources import read_documents, resolve_inputs
    from scaleforge.data_pipeline.tokenizer import Tokenizer, train_sentencepiece

    def sample():
        read = 0
        for unit in resolve_inputs(job.input):
            for document in read_documents(unit, job.text_field):
                yield document.text
                read += len(document.text.encode("utf-8"))
                if read >= job.sample_bytes:
                    return

    path = train_sentencepiece(sample(), job.vocab_size, job.out, job.model_type)
    tokenizer = Tokenizer.load(path)
    print(f"tokenizer: {path} ({tokenizer.vocab_size} ids, sha256 {tokenizer.hash[:12]})")


def write_shards(arguments: list[str]) -> None:
    """Tokenize into shards (see data_pipeline/shards.py) and summarize the manifest."""
    from scaleforge.data_pipeline.shards import ShardsJob
    from scaleforge.data_pipeline.shards import write_shards as write

    manifest = write(parse(ShardsJob, arguments, "shards"))
    for split in ("train", "val"):
        summary = manifest["splits"][split]
        print(f"{split}: {summary['tokens']:,} tokens, {summary['documents']:,} documents, "
              f"{len(summary['shards'])} shards")


def parse(schema: type, arguments: list[str], command: str):
    """key=value arguments as a `schema` dataclass; ConfigError naming a bad key or value."""
    names = [f.name for f in fields(schema)]
    for argument in arguments:
        key = argument.split("=", 1)[0]
        if "=" not in argument or key not in names:
            raise ConfigError(
                f"sf-preprocess {command}: {argument!r} is not one of {', '.join(names)} "
                "given as key=value"
            )
    try:
        config = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(arguments))
        return OmegaConf.to_object(config)
    except OmegaConfBaseException as error:
        raise ConfigError(f"sf-preprocess {command}: {error.msg}") from error


def _prepare() -> None:
    """The corpus mode's data of a Hydra config, as sf-train would build it."""
    import hydra
    from omegaconf import DictConfig

    from scaleforge.core.config import register_configs, to_config

    register_configs()

    @hydra.main(version_base=None, config_path="../configs", config_name="preprocess")
    def run(cfg: DictConfig) -> None:
        from scaleforge.data_pipeline.loader import build_loaders

        prepared = exit_on_config_error(build_loaders, to_config(cfg).data, 1).prepared
        print(f"shards: {', '.join(str(d) for d in prepared.directories)}", flush=True)

    run()


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: sf-preprocess {{{','.join(COMMANDS)}}} key=value ...\n{__doc__}",
              file=sys.stderr)
        sys.exit(2)
    command, arguments = sys.argv[1], sys.argv[2:]
    if command == "prepare":
        sys.argv = [sys.argv[0], *arguments]  # Hydra reads its overrides from sys.argv
        _prepare()
    elif command == "tokenizer":
        exit_on_config_error(lambda: train_tokenizer(parse(TokenizerJob, arguments, command)))
    else:
        exit_on_config_error(write_shards, arguments)


if __name__ == "__main__":
    main()
