"""`sf-preprocess`: train a tokenizer, or tokenize a corpus into shards, with key=value args.

    sf-preprocess tokenizer input='raw/**/*.jsonl.gz' vocab_size=32000 out=tok/
    sf-preprocess shards input='raw/**/*.jsonl.gz' tokenizer=tok/ out=shards/web workers=16
    sf-preprocess prepare data.corpus='books/**/*.txt'   # a config's corpus-mode data
    sf-preprocess sft input='chats/*.jsonl' tokenizer=runs/llama out=shards/chat
    sf-preprocess docstrings out=runs/sft/docstrings.jsonl   # the fine-tuning demo's data

`tokenizer` trains sentencepiece (model_type=bpe or unigram, byte fallback, UNK/BOS/EOS/PAD
= 0/1/2/3) on a sample of the input. `shards` takes a tokenizer directory or a Hugging Face
tokenizer.json; rerun it after an interruption and it resumes. `prepare` takes the same
Hydra overrides as sf-train and builds the corpus mode's cache. Training then reads the
shards with `sf-train data=shards data.path=shards/web`. `sft` renders conversations with a
chat template into the same shards plus a mask of the trained (assistant) tokens, read by
`sf-train +experiment=sft data.path=shards/chat`; `docstrings` writes function signature ->
docstring pairs of the standard library as such conversations.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scaleforge.data_pipeline import conversation_shards, shards
from scaleforge.data_pipeline.split import ENOUGH_VAL_TOKENS, val_fraction_for
from scaleforge.errors import exit_on_config_error
from scaleforge.launch.key_value import Handlers, is_help, required, run_subcommand


@dataclass
class TokenizerJob:
    """The settings of `sf-preprocess tokenizer` (each is a key=value argument)."""

    # Text to learn from: a glob of .txt, .jsonl(.gz) or .parquet files, or a dataset.
    input: str = required("GLOB (files, or a Hugging Face dataset)")
    vocab_size: int = required("N")  # pieces of the tokenizer (ids, special tokens included)
    out: str = required("DIR")  # the tokenizer's directory
    model_type: str = "bpe"  # sentencepiece's algorithm: bpe or unigram
    text_field: str = "text"  # the field of a jsonl/parquet record that holds the text
    # Bytes of text read from the start of the input to train on (the tokenizer then uses
    # at most 300,000 evenly spaced lines of it).
    sample_bytes: int = 200_000_000


def train_tokenizer(job: TokenizerJob) -> None:
    """Train a sentencepiece tokenizer on a sample of `job.input` into `job.out`."""
    from scaleforge.data_pipeline.sources import read_documents, resolve_inputs
    from scaleforge.data_pipeline.tokenizer import Tokenizer, train_sentencepiece

    def sample() -> Iterator[str]:
        read = 0
        for unit in resolve_inputs(job.input):
            for document in read_documents(unit, job.text_field):
                yield document.text
                read += len(document.text.encode("utf-8"))
                if read >= job.sample_bytes:
                    return

    path = train_sentencepiece(sample(), job.vocab_size, Path(job.out), job.model_type)
    tokenizer = Tokenizer.load(path)
    print(f"tokenizer: {path} ({tokenizer.vocab_size} ids, sha256 {tokenizer.hash[:12]})")


def write_shards(job: shards.ShardsJob) -> None:
    """Tokenize into shards (see data_pipeline/shards.py) and summarize the manifest."""
    manifest = shards.write_shards(job)
    for split in ("train", "val"):
        summary = manifest["splits"][split]
        print(f"{split}: {summary['tokens']:,} tokens, {summary['documents']:,} documents, "
              f"{len(summary['shards'])} shards")
    val_tokens = manifest["splits"]["val"]["tokens"]
    if val_tokens < ENOUGH_VAL_TOKENS:
        splits = manifest["splits"].values()
        total, documents = (sum(s[key] for s in splits) for key in ("tokens", "documents"))
        fraction = val_fraction_for(ENOUGH_VAL_TOKENS, job.val_fraction,
                                    manifest.get("lowest_documents", []), total, documents)
        print(f"warning: validation holds {val_tokens:,} tokens, fewer than "
              f"{ENOUGH_VAL_TOKENS:,} (8 sequences of 1,024); rerun with "
              f"val_fraction={fraction} (now {job.val_fraction}) into a new out= directory",
              file=sys.stderr)


@dataclass
class DocstringsJob:
    """The settings of `sf-preprocess docstrings` (each is a key=value argument)."""

    out: str = required("FILE.jsonl")  # where the prompt/response records go
    max_bytes: int = 8_000_000  # standard-library source bytes to read (files in order)
    max_response_chars: int = 200  # a docstring summary is cut to this many characters


def write_docstrings(job: DocstringsJob) -> None:
    """Write the standard library's signature -> docstring pairs as JSONL."""
    from scaleforge.data_pipeline.docstring_pairs import write_docstring_pairs

    count = write_docstring_pairs(Path(job.out), job.max_bytes, job.max_response_chars)
    print(f"docstrings: {count:,} prompt/response pairs -> {job.out}")


def write_sft_shards(job: conversation_shards.ConversationShardsJob) -> None:
    """Render conversations into shards with a trained-token mask and summarize them.
    `tokenizer=` may also name a run or checkpoint directory: the tokenizer of its data."""
    job.tokenizer = str(_model_tokenizer(Path(job.tokenizer)))
    manifest = conversation_shards.write_conversation_shards(job)
    sft = manifest[conversation_shards.SFT_SECTION]
    print(f"template: {sft['template']}")
    for split in ("train", "val"):
        summary = manifest["splits"][split]
        print(f"{split}: {summary['documents']:,} conversations, {summary['tokens']:,} tokens, "
              f"{sft['trained_tokens'][split]:,} of them trained (assistant)")


def _model_tokenizer(path: Path) -> Path:
    """`path` itself when it holds a tokenizer (a tokenizer file or directory, or what
    sf-convert from-hf wrote, the model's tokenizer.json beside it); for a run or checkpoint
    directory without one, the tokenizer of the data it was trained on."""
    from scaleforge.data_pipeline.tokenizer import HF_FILE, SENTENCEPIECE_FILE

    if not path.is_dir() or any((path / name).is_file() for name in (HF_FILE,
                                                                     SENTENCEPIECE_FILE)):
        return path
    from scaleforge.core.checkpoint.paths import find_checkpoint
    from scaleforge.core.checkpoint.safe_load import load_checkpoint_config
    from scaleforge.data_pipeline.vocabulary import data_tokenizer

    config_dir = path if (path / "config.yaml").is_file() else find_checkpoint(path,
                                                                              "tokenizer")
    return data_tokenizer(load_checkpoint_config(config_dir).data).path


_HANDLERS: Handlers = {
    "tokenizer": (TokenizerJob, train_tokenizer), "shards": (shards.ShardsJob, write_shards),
    "sft": (conversation_shards.ConversationShardsJob, write_sft_shards),
    "docstrings": (DocstringsJob, write_docstrings),
}


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
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "prepare" and is_help(sys.argv[2:]):
        from scaleforge.launch.train_help import train_help

        # prepare takes sf-train's overrides; it reads the data.* settings
        print(train_help(__doc__ or "", [a for a in sys.argv[2:] if not a.startswith("-")]))
    elif command == "prepare":
        sys.argv = [sys.argv[0], *sys.argv[2:]]  # Hydra reads its overrides from sys.argv
        _prepare()
    elif command in _HANDLERS or command in ("-h", "--help"):
        exit_on_config_error(run_subcommand, "sf-preprocess", _HANDLERS, sys.argv[1:],
                             __doc__ or "")
    else:
        print(f"usage: sf-preprocess {{{','.join([*_HANDLERS, 'prepare'])}}} key=value ...\n"
              f"{__doc__}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
