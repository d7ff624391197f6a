"""The data settings (`data.*`) and the checks of their own fields.

Rules that relate them to other settings (data.seq_len against model.max_seq_len, the
vocabulary against the model's) live in `core.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scaleforge.errors import ConfigError, check_choice

DATA_MODES = ("corpus", "shards", "streaming")


@dataclass
class BlendSourceConfig:
    """One shard directory of a blend and its share of the training samples (weights are
    normalized over the blend)."""

    path: str = ""
    weight: float = 1.0


@dataclass
class SftDataConfig:
    """Instruction data (shards of `sf-preprocess sft`): how conversations are packed."""

    # A conversation longer than data.seq_len + 1 tokens: drop it, or truncate it to its
    # first seq_len + 1 tokens (either is counted and reported at start).
    overlong: str = "drop"


@dataclass
class DataConfig:
    """Where tokens come from; `mode` picks one of three:

    - corpus: `corpus` is "stdlib" (the Python standard library's own .py files, no
      download) or a glob of local text files, one document per file; tokenizer and shards
      are built on first use into `cache_dir` (the demo).
    - shards: `path`, a directory written by `sf-preprocess shards`, or `blend`, several of
      them with weights.
    - streaming: `dataset` (a Hugging Face hub name, a save_to_disk directory, or a glob of
      jsonl/parquet files) tokenized on the fly with `tokenizer`.
    """

    mode: str = "corpus"  # corpus, shards or streaming (see above)
    corpus: str = "stdlib"  # corpus mode: "stdlib" or a glob of text files
    cache_dir: str = "data_cache"  # corpus mode: where its tokenizer and shards are cached
    # Token ids of the tokenizer; null (shards and streaming modes' default): the
    # tokenizer's own, read from the shards' manifest or data.tokenizer. Corpus mode trains
    # a tokenizer of this size.
    vocab_size: int | None = 4096
    max_corpus_bytes: int = 8_000_000  # corpus mode: read at most this much text
    # Corpus and streaming modes: the share of documents held out for validation (shards
    # mode: set by `sf-preprocess shards val_fraction=`).
    val_fraction: float = 0.05
    # Tokens per training sequence; data=shards and data=streaming default to
    # model.max_seq_len.
    seq_len: int = 256
    seed: int = 1234  # shuffling seed of the training windows
    path: str | None = None  # shards mode: a directory written by sf-preprocess shards
    # shards mode: several shard directories with weights, instead of path.
    blend: list[BlendSourceConfig] = field(default_factory=list)
    dataset: str | None = None  # streaming mode: hub name, save_to_disk dir or file glob
    tokenizer: str | None = None  # streaming mode: a tokenizer directory or tokenizer.json
    # corpus and streaming modes: the field holding each JSONL/parquet document's text
    text_field: str = "text"
    # DataLoader worker processes preparing training batches ahead; -1 (auto): one when
    # training on CUDA (batches are ready while the GPU computes), none on CPU (a worker
    # would compete with the ranks for the cores).
    num_workers: int = -1
    verify_shards: bool = True  # check every shard's sha256 and token range at start
    # Hand the model each packed window's document ids (a new document after each EOS), so
    # no token attends to an earlier document of its window (model.attention masks them).
    document_masking: bool = False
    # Conversation shards (sf-preprocess sft, read with data.path): packing settings.
    sft: SftDataConfig = field(default_factory=SftDataConfig)

    def check(self, prefix: str = "data") -> None:
        """Raise ConfigError naming the first field whose value is not allowed."""
        check_choice(f"{prefix}.mode", self.mode, DATA_MODES)
        check_choice(f"{prefix}.sft.overlong", self.sft.overlong, ("drop", "truncate"))
        if self.num_workers < -1:
            raise ConfigError(
                f"{prefix}.num_workers={self.num_workers} must be -1 (auto) or at least 0"
            )
        if self.seq_len <= 0:
            raise ConfigError(f"{prefix}.seq_len={self.seq_len} must be positive")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(
                f"{prefix}.val_fraction={self.val_fraction} must lie strictly between 0 and 1"
            )

    def workers(self, accelerator: bool) -> int:
        """DataLoader workers for the training batches: `num_workers`, with auto (-1)
        resolved to 1 when batches go to an accelerator and 0 when training on CPU."""
        if self.num_workers == -1:
            return 1 if accelerator else 0
        return self.num_workers
