"""Train and use a sentencepiece BPE tokenizer that round-trips source code exactly.

The text is not normalized and whitespace is kept as is (indentation matters in code).
sentencepiece trains on single lines, so newline is a user-defined piece of its own; every
other character outside the vocabulary falls back to its UTF-8 bytes, so any text encodes.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from scaleforge.core.errors import ConfigError
from scaleforge.data_pipeline.corpus import read_document

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
NEWLINE = "\n"
BYTE_PIECES = 256
SPECIAL_PIECES = 4  # UNK, BOS, EOS and the newline piece
# A bounded, evenly spaced sample of lines keeps training to seconds on any corpus size.
MAX_TRAINING_LINES = 300_000
# sentencepiece skips longer lines (its max_sentence_length, in bytes); we skip them first so
# that the vocabulary check below sees the same text.
MAX_LINE_BYTES = 4192
CHARACTER_COVERAGE = 0.9995
# sentencepiece replaces a space by this symbol before it counts characters.
_SPACE_SYMBOL = "\u2581"


class Tokenizer:
    """A trained sentencepiece model. Ids are ints in [0, vocab_size)."""

    def __init__(self, model_path: Path):
        self.model_path = Path(model_path)
        self._processor = spm.SentencePieceProcessor(model_file=str(self.model_path))

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS. decode(encode(text)) == text, except that the
        character U+2581 (which sentencepiece uses to mark spaces) decodes as a space."""
        return self._processor.encode(text)

    def encode_many(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """encode() of each text, on `num_threads` threads (default: every CPU), in order."""
        return self._processor.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids; BOS/EOS decode to nothing."""
        return self._processor.decode([int(i) for i in ids])


def train_tokenizer(documents: list[Path], vocab_size: int, out_prefix: Path) -> Path:
    """Train a BPE model of `vocab_size` pieces on the lines of `documents`.

    Writes `<out_prefix>.model` (and sentencepiece's `.vocab` listing) and returns the model
    path. Raises ConfigError naming `data.vocab_size` when it is too small for the byte
    fallback pieces, the special pieces and the characters of the corpus, or larger than the
    corpus can fill.
    """
    lines = _training_lines(documents)
    minimum = minimum_vocab_size(lines)
    if vocab_size < minimum:
        raise _vocab_too_small(vocab_size, minimum)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(out_prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=[NEWLINE],
            character_coverage=CHARACTER_COVERAGE,
            max_sentence_length=MAX_LINE_BYTES,
            shuffle_input_sentence=False,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise _as_config_error(error, vocab_size) from error
    return Path(f"{out_prefix}.model")


def minimum_vocab_size(lines: Sequence[str]) -> int:
    """The smallest vocab_size sentencepiece accepts for these training lines: the byte
    pieces, UNK/BOS/EOS, the newline piece and the characters that cover
    CHARACTER_COVERAGE of the text (sentencepiece's own rule)."""
    counts = Counter("".join(lines).replace(" ", _SPACE_SYMBOL))
    total = sum(counts.values())
    covered, required_chars = 0, 0
    for _, count in counts.most_common():
        if covered / total >= CHARACTER_COVERAGE:
            break
        covered += count
        required_chars += 1
    return BYTE_PIECES + SPECIAL_PIECES + required_chars


def _training_lines(documents: list[Path]) -> list[str]:
    lines = [
        line
        for path in documents
        for line in read_document(path).split(NEWLINE)
        if line and len(line.encode("utf-8")) <= MAX_LINE_BYTES
    ]
    if not lines:
        raise ConfigError(
            "data.corpus: the training documents hold no line a tokenizer can learn from; point "
            "data.corpus at text files"
        )
    if len(lines) > MAX_TRAINING_LINES:
        stride = len(lines) / MAX_TRAINING_LINES
        lines = [lines[int(i * stride)] for i in range(MAX_TRAINING_LINES)]
    return lines


def _vocab_too_small(vocab_size: int, minimum: int) -> ConfigError:
    return ConfigError(
        f"data.vocab_size={vocab_size} is too small for this corpus: the 256 byte-fallback "
        f"pieces, the special pieces and the corpus characters need at least {minimum}; set "
        f"data.vocab_size >= {minimum}"
    )


def _as_config_error(error: RuntimeError, vocab_size: int) -> Exception:
    """sentencepiece reports a bad vocabulary size as a RuntimeError with the bound in it."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error))
    if too_small:
        return _vocab_too_small(vocab_size, int(too_small.group(1)))
    too_large = re.search(r"Vocabulary size too high \(\d+\)\. .*<= (\d+)", str(error))
    if too_large:
        return ConfigError(
            f"data.vocab_size={vocab_size} is more pieces than this corpus can fill (at most "
            f"{too_large.group(1)}); lower data.vocab_size or raise data.max_corpus_bytes"
        )
    return error
