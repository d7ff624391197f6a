"""One Tokenizer interface over sentencepiece models and Hugging Face tokenizer.json files,
and training of sentencepiece models (BPE or unigram) that round-trip text exactly.

Training keeps text as is: no normalization, whitespace kept (indentation matters in code).
sentencepiece trains on single lines, so newline is a user-defined piece of its own; every
other character outside the vocabulary falls back to its UTF-8 bytes, so any text encodes.
Ids 0-3 are UNK, BOS, EOS and PAD.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from scaleforge.errors import ConfigError, check_choice

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
NEWLINE = "\n"
BYTE_PIECES = 256
SPECIAL_PIECES = 5  # UNK, BOS, EOS, PAD and the newline piece
# A bounded, evenly spaced sample of lines keeps training to seconds on any corpus size.
MAX_TRAINING_LINES = 300_000
# sentencepiece skips longer lines (its max_sentence_length, in bytes); we skip them first so
# that the vocabulary check below sees the same text.
MAX_LINE_BYTES = 4192
CHARACTER_COVERAGE = 0.9995
# sentencepiece replaces a space by this symbol before it counts characters.
_SPACE_SYMBOL = "\u2581"
# End-of-document tokens of common Hugging Face tokenizers, tried in this order.
_HF_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")
_HF_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_HF_PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>")


class Tokenizer(ABC):
    """Text <-> token ids in [0, vocab_size). Load one with Tokenizer.load(path)."""

    path: Path
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @staticmethod
    def load(path: str | Path) -> Tokenizer:
        """The tokenizer at `path`: a sentencepiece `.model`, a Hugging Face `tokenizer.json`,
        or a directory holding one of them (as `sf-preprocess tokenizer` writes)."""
        path = Path(path)
        if path.is_dir():
            for name in (SENTENCEPIECE_FILE, HF_FILE):
                if (path / name).is_file():
                    return Tokenizer.load(path / name)
            raise ConfigError(
                f"tokenizer={str(path)!r} holds neither {SENTENCEPIECE_FILE} nor {HF_FILE}; point "
                "it at the out= directory of `sf-preprocess tokenizer` or at a tokenizer.json"
            )
        if not path.is_file():
            raise ConfigError(f"tokenizer={str(path)!r} does not exist; give a tokenizer path")
        if path.suffix == ".json":
            return HFTokenizer(path)
        return SentencePieceTokenizer(path)

    @property
    def hash(self) -> str:
        """sha256 of the tokenizer file: shards record it to detect a tokenizer swap."""
        return file_sha256(self.path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self.encode_many([text], num_threads=1)[0]

    @abstractmethod
    def encode_many(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """encode() of each text, in order, on `num_threads` threads (default: every CPU)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids; special tokens decode to nothing."""


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model. decode(encode(text)) == text for the models train_sentencepiece
    writes, except that U+2581 (sentencepiece's space marker) decodes as a space."""

    def __init__(self, model_path: Path):
        self.path = Path(model_path)
        try:
            self._processor = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as error:
            raise ConfigError(
                f"tokenizer {self.path} is not a sentencepiece model ({error}); give a .model "
                "file or a tokenizer.json"
            ) from error
        self.vocab_size = self._processor.vocab_size()
        self.bos_id = self._processor.bos_id()
        self.eos_id = self._processor.eos_id()
        self.pad_id = self._processor.pad_id()

    def encode_many(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        return self._processor.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json. Encodes without added special tokens; EOS
    is the first of </s>, <|endoftext|>, <|end_of_text|>, <eos>, [SEP] in the vocabulary."""

    def __init__(self, json_path: Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(json_path)
        try:
            self._tokenizer = RustTokenizer.from_file(str(self.path))
        except Exception as error:  # tokenizers raises a bare Exception on a bad file
            raise ConfigError(
                f"tokenizer {self.path} is not a Hugging Face tokenizer.json ({error})"
            ) from error
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        eos_id = self._first_token_id(_HF_EOS_TOKENS)
        if eos_id is None:
            raise ConfigError(
                f"tokenizer {self.path} has no end-of-document token (none of "
                f"{', '.join(_HF_EOS_TOKENS)}); add one, documents are separated by it"
            )
        self.eos_id = eos_id
        self.bos_id = _or_minus_one(self._first_token_id(_HF_BOS_TOKENS))
        self.pad_id = _or_minus_one(self._first_token_id(_HF_PAD_TOKENS))

    def encode_many(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        # The Rust side parallelizes batches itself (RAYON_NUM_THREADS bounds it).
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _first_token_id(self, tokens: Sequence[str]) -> int | None:
        for token in tokens:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return None


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Path,
    model_type: str = "bpe",
    setting: str = "vocab_size",
) -> Path:
    """Train a sentencepiece model of `vocab_size` pieces on the lines of `texts`.

    Writes `<out_dir>/tokenizer.model` (and sentencepiece's `.vocab` listing) and returns its
    path. At most MAX_TRAINING_LINES evenly spaced lines are used. Raises ConfigError naming
    `setting` when the vocabulary is too small for the byte fallback pieces, the special
    pieces and the characters of the text, or larger than the text can fill.
    """
    check_choice("model_type", model_type, MODEL_TYPES)
    lines = _training_lines(texts)
    minimum = minimum_vocab_size(lines)
    if vocab_size < minimum:
        raise _vocab_too_small(setting, vocab_size, minimum)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / Path(SENTENCEPIECE_FILE).stem
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(prefix),
            model_type=model_type,
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
            pad_id=PAD_ID,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise _as_config_error(error, setting, vocab_size) from error
    return out_dir / SENTENCEPIECE_FILE


def minimum_vocab_size(lines: Sequence[str]) -> int:
    """The smallest vocab_size sentencepiece accepts for these training lines: the byte
    pieces, UNK/BOS/EOS/PAD, the newline piece and the characters that cover
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


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _training_lines(texts: Iterable[str]) -> list[str]:
    lines = [
        line
        for text in texts
        for line in text.split(NEWLINE)
        if line and len(line.encode("utf-8")) <= MAX_LINE_BYTES
    ]
    if not lines:
        raise ConfigError(
            "the tokenizer's training documents hold no line it can learn from; point the "
            "input at text"
        )
    if len(lines) > MAX_TRAINING_LINES:
        stride = len(lines) / MAX_TRAINING_LINES
        lines = [lines[int(i * stride)] for i in range(MAX_TRAINING_LINES)]
    return lines


def _or_minus_one(token_id: int | None) -> int:
    return -1 if token_id is None else token_id


def _vocab_too_small(setting: str, vocab_size: int, minimum: int) -> ConfigError:
    return ConfigError(
        f"{setting}={vocab_size} is too small for this corpus: the 256 byte-fallback pieces, "
        f"the special pieces and the corpus characters need at least {minimum}; set "
        f"{setting} >= {minimum}"
    )


def _as_config_error(error: RuntimeError, setting: str, vocab_size: int) -> Exception:
    """sentencepiece reports a bad vocabulary size as a RuntimeError with the bound in it."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error))
    if too_small:
        return _vocab_too_small(setting, vocab_size, int(too_small.group(1)))
    too_large = re.search(r"Vocabulary size too high \(\d+\)\. .*<= (\d+)", str(error))
    if too_large:
        return ConfigError(
            f"{setting}={vocab_size} is more pieces than this corpus can fill (at most "
            f"{too_large.group(1)}); lower {setting} or give more text"
        )
    return error
