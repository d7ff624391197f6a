"""The data pipeline: corpus, tokenizer, token files, prepare's cache and the loaders."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from scaleforge.core.config import DataConfig
from scaleforge.core.errors import ConfigError
from scaleforge.data_pipeline import prepare as prepare_module
from scaleforge.data_pipeline.corpus import find_documents, read_document
from scaleforge.data_pipeline.loader import TokenWindows, TrainBatches, ValBatches, build_loaders
from scaleforge.data_pipeline.prepare import prepare, split_documents
from scaleforge.data_pipeline.token_file import (
    read_document_index,
    read_token_file,
    token_dtype,
    write_token_file,
)
from scaleforge.data_pipeline.tokenizer import Tokenizer, minimum_vocab_size, train_tokenizer

VOCAB = 400

CODE = (
    "def f(x):\n"
    "    if x:\n"
    "\treturn x  \n"
    "\n\n"
    "        # deep indent, trailing spaces   \n"
    "  leading = 'two spaces'\r\n"
    "s = 'héllo ✓ 😀 日本'\n"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 small text documents cut from standard-library source files."""
    directory = tmp_path_factory.mktemp("corpus")
    sources = [p for p in find_documents("stdlib", 2_000_000) if p.stat().st_size > 4000]
    for i, path in enumerate(sources[:40]):
        (directory / f"doc{i:02d}.py").write_text(read_document(path)[:4000])
    return directory


@pytest.fixture(scope="module")
def data_cfg(corpus, tmp_path_factory) -> DataConfig:
    return DataConfig(
        corpus=str(corpus / "**" / "*.py"),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        vocab_size=VOCAB,
        max_corpus_bytes=1_000_000,
        val_fraction=0.1,
        seq_len=32,
        seed=7,
    )


@pytest.fixture(scope="module")
def prepared(data_cfg):
    return prepare(data_cfg)


def windows_over_range(num_windows: int, seq_len: int = 4) -> TokenWindows:
    """Windows whose first input token is k * seq_len, so a window's id can be read back."""
    return TokenWindows(np.arange(num_windows * seq_len + 1, dtype=np.uint16), seq_len)


def ids_of(inputs: torch.Tensor, seq_len: int = 4) -> list[int]:
    return (inputs[:, 0] // seq_len).tolist()


# corpus


def test_stdlib_corpus_is_sorted_python_files_within_the_byte_budget():
    documents = find_documents("stdlib", 200_000)
    sizes = [path.stat().st_size for path in documents]
    assert documents == sorted(documents)
    assert all(path.suffix == ".py" and "site-packages" not in path.parts for path in documents)
    assert all(size > 0 for size in sizes)
    assert sum(sizes[:-1]) < 200_000 <= sum(sizes)


def test_missing_corpus_path_names_data_corpus(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.corpus=.*matches no files"):
        find_documents(str(tmp_path / "missing" / "*.txt"), 1000)


def test_empty_corpus_names_data_corpus(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(ConfigError, match=r"data\.corpus=.*empty corpus"):
        find_documents(str(tmp_path / "*.txt"), 1000)


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "good.txt").write_text("hello")
    (tmp_path / "broken.txt").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"data\.corpus.*broken\.txt"):
        find_documents(str(tmp_path / "*.txt"), 1000)


# tokenizer


@pytest.fixture(scope="module")
def tokenizer(prepared) -> Tokenizer:
    return Tokenizer(prepared.tokenizer_path)


def test_tokenizer_round_trips_code_with_indentation_and_newlines(tokenizer):
    assert tokenizer.decode(tokenizer.encode(CODE)) == CODE
    stdlib_file = find_documents("stdlib", 1)[0]
    text = read_document(stdlib_file)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_many([CODE, text]) == [tokenizer.encode(CODE), tokenizer.encode(text)]


def test_tokenizer_has_distinct_bos_and_eos_within_the_vocabulary(tokenizer):
    assert tokenizer.vocab_size == VOCAB
    assert len({tokenizer.bos_id, tokenizer.eos_id}) == 2
    assert 0 <= min(tokenizer.bos_id, tokenizer.eos_id) < VOCAB


def test_too_small_vocab_names_data_vocab_size_and_a_minimum_that_works(data_cfg, tmp_path):
    documents = find_documents(data_cfg.corpus, data_cfg.max_corpus_bytes)[:5]
    with pytest.raises(ConfigError, match=r"data\.vocab_size=100 .*at least (\d+)") as error:
        train_tokenizer(documents, 100, tmp_path / "small")
    minimum = int(str(error.value).split("data.vocab_size >= ")[1])
    Tokenizer(train_tokenizer(documents, minimum, tmp_path / "minimum"))


def test_minimum_vocab_size_counts_bytes_specials_and_characters():
    # 256 byte pieces + UNK, BOS, EOS, newline + the characters a, b and the space symbol.
    assert minimum_vocab_size(["ab a", "ba"]) == 256 + 4 + 3


def test_vocab_larger_than_the_corpus_supports_names_data_vocab_size(tmp_path):
    document = tmp_path / "tiny.txt"
    document.write_text("abc abc\n" * 10)
    with pytest.raises(ConfigError, match=r"data\.vocab_size=5000 .*at most \d+"):
        train_tokenizer([document], 5000, tmp_path / "large")


# token files


def test_token_dtype_is_uint16_up_to_65536_ids_then_uint32():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@pytest.mark.parametrize("vocab_size", [1000, 70000])
def test_token_file_puts_eos_after_each_document_and_indexes_them(tmp_path, vocab_size):
    documents = [[5, 6, 7], [vocab_size - 1], [8, 9]]
    path = tmp_path / "tokens.bin"
    assert write_token_file(path, iter(documents), vocab_size, eos_id=2) == 9
    tokens = read_token_file(path, vocab_size)
    assert tokens.dtype == token_dtype(vocab_size)
    assert path.stat().st_size == 9 * tokens.dtype.itemsize
    assert tokens.tolist() == [5, 6, 7, 2, vocab_size - 1, 2, 8, 9, 2]
    assert read_document_index(path).tolist() == [0, 4, 6, 9]


# windows and batches


def test_targets_are_inputs_shifted_by_one_and_match_the_token_file(prepared, data_cfg):
    tokens = read_token_file(prepared.train_tokens_path, prepared.vocab_size)
    windows = TokenWindows(tokens, data_cfg.seq_len)
    inputs, targets = windows.batch(np.array([0, 3, len(windows) - 1]))
    assert inputs.dtype == targets.dtype == torch.long
    assert inputs.shape == targets.shape == (3, data_cfg.seq_len)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    seq_len = data_cfg.seq_len
    for row, k in enumerate([0, 3, len(windows) - 1]):
        expected = torch.from_numpy(tokens[k * seq_len : (k + 1) * seq_len + 1].astype(np.int64))
        assert torch.equal(inputs[row], expected[:-1])
        assert torch.equal(targets[row], expected[1:])


def test_same_seed_gives_the_same_order_and_another_seed_a_different_one():
    def first_ids(seed: int) -> list[int]:
        batches = TrainBatches(windows_over_range(50), micro_batch_size=5, seed=seed)
        return [i for _ in range(10) for i in ids_of(next(batches)[0])]

    assert first_ids(1) == first_ids(1)
    assert first_ids(1) != first_ids(2)


def test_each_epoch_visits_every_window_exactly_once():
    # 23 windows and 5 samples per micro-batch: micro-batches straddle epoch boundaries.
    batches = TrainBatches(windows_over_range(23), micro_batch_size=5, seed=3)
    stream = [i for _ in range(23 * 3 // 5 + 1) for i in batches.next_window_ids()]
    epochs = [stream[e * 23 : (e + 1) * 23] for e in range(3)]
    assert all(sorted(epoch) == list(range(23)) for epoch in epochs)
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_see_disjoint_samples_that_together_are_the_single_process_ones(dp_size):
    windows, micro_batch_size, steps = windows_over_range(37), 3, 7
    single = TrainBatches(windows, micro_batch_size, seed=11)
    single_batches = [next(single)[0] for _ in range(steps * dp_size)]
    ranks = [TrainBatches(windows, micro_batch_size, 11, rank, dp_size) for rank in range(dp_size)]
    group_stream = []
    for step in range(steps):
        for rank, batches in enumerate(ranks):
            inputs = next(batches)[0]
            assert torch.equal(inputs, single_batches[step * dp_size + rank])
            group_stream += ids_of(inputs)
    assert group_stream == [i for inputs in single_batches for i in ids_of(inputs)]
    # Within an epoch no two ranks, and no two steps, share a sample.
    assert sorted(group_stream[:37]) == list(range(37))


def test_resumed_loader_yields_the_same_following_batches():
    windows = windows_over_range(20)
    original = TrainBatches(windows, micro_batch_size=3, seed=5, dp_rank=1, dp_size=2)
    for _ in range(6):  # 36 samples: past the first epoch boundary
        next(original)
    state = original.state_dict()
    expected = [next(original) for _ in range(8)]
    resumed = TrainBatches(windows, micro_batch_size=3, seed=5, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    for want_inputs, want_targets in expected:
        inputs, targets = next(resumed)
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)


def test_validation_batches_are_fixed_and_split_over_dp_ranks():
    windows = windows_over_range(10)
    single = [ids_of(x) for x, _ in ValBatches(windows, micro_batch_size=2).batches(4)]
    assert single == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [ids_of(x) for x, _ in ValBatches(windows, 2).batches(4)] == single
    rank1 = [ids_of(x) for x, _ in ValBatches(windows, 2, dp_rank=1, dp_size=2).batches(3)]
    assert rank1 == [[2, 3], [6, 7], [0, 1]]  # the third wraps around the 10 windows


# prepare and build_loaders


def test_train_and_val_share_no_document(prepared, data_cfg):
    assert prepared.val_documents and prepared.train_documents
    assert not set(prepared.train_documents) & set(prepared.val_documents)
    all_documents = find_documents(data_cfg.corpus, data_cfg.max_corpus_bytes)
    assert {str(p) for p in all_documents} == {*prepared.train_documents, *prepared.val_documents}
    assert len(read_document_index(prepared.val_tokens_path)) == len(prepared.val_documents) + 1


def test_split_is_reproducible_from_the_seed():
    documents = [Path(f"doc{i}") for i in range(20)]
    assert split_documents(documents, 0.2, seed=1) == split_documents(documents, 0.2, seed=1)
    assert split_documents(documents, 0.2, seed=1) != split_documents(documents, 0.2, seed=2)
    assert len(split_documents(documents, 0.01, seed=1)[1]) == 1


def test_prepare_reuses_its_cache(prepared, data_cfg, monkeypatch):
    def must_not_train(*args):
        raise AssertionError("prepare retrained instead of reusing the cache")

    monkeypatch.setattr(prepare_module, "train_tokenizer", must_not_train)
    started = time.perf_counter()
    assert prepare(data_cfg) == prepared
    assert time.perf_counter() - started < 1.0


def test_prepare_ignores_a_leftover_temporary_directory(data_cfg, tmp_path):
    cfg = replace(data_cfg, cache_dir=str(tmp_path), seed=8)
    finished = prepare(cfg).directory
    # Simulate a run killed mid-way: only its temporary directory is left, half written.
    leftover = finished.with_name(finished.name + ".tmp-killed")
    finished.rename(leftover)
    (leftover / "train.bin").write_bytes(b"\x00" * 3)
    rebuilt = prepare(cfg)
    assert rebuilt.directory == finished
    assert rebuilt.train_tokens_path.stat().st_size == 2 * rebuilt.train_tokens
    assert leftover.exists()


def test_build_loaders_yields_batches_of_the_configured_shape(data_cfg):
    train, val, tokenizer, prepared = build_loaders(data_cfg, micro_batch_size=4)
    inputs, targets = next(train)
    assert inputs.shape == targets.shape == (4, data_cfg.seq_len)
    assert inputs.max() < tokenizer.vocab_size == prepared.vocab_size
    assert len(list(val.batches(3))) == 3


def test_too_short_validation_split_names_data_val_fraction(data_cfg):
    with pytest.raises(ConfigError, match=r"data\.val_fraction=.*data\.seq_len"):
        build_loaders(replace(data_cfg, seq_len=100_000), micro_batch_size=1)


def test_too_small_training_split_names_data_max_corpus_bytes(data_cfg, prepared):
    with pytest.raises(ConfigError, match=r"data\.max_corpus_bytes=.*micro-batch"):
        build_loaders(data_cfg, micro_batch_size=prepared.train_tokens)
