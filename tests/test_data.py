"""The loader: corpus mode, windows, blending, DP x worker split, resume, streaming."""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from scaleforge.data_pipeline import prepare as prepare_module
from scaleforge.data_pipeline.config import BlendSourceConfig, DataConfig
from scaleforge.data_pipeline.corpus import find_documents
from scaleforge.data_pipeline.loader import TrainBatches, ValBatches, build_loaders
from scaleforge.data_pipeline.manifest import load_manifest
from scaleforge.data_pipeline.prepare import prepare
from scaleforge.data_pipeline.samples import (
    BlendedSamples,
    TokenStream,
    TokenWindows,
    document_ids,
)
from scaleforge.data_pipeline.split import hash_position, lowest_documents, val_fraction_for
from scaleforge.data_pipeline.streaming import StreamingBatches
from scaleforge.data_pipeline.tokenizer import Tokenizer
from scaleforge.errors import ConfigError

VOCAB = 400


@pytest.fixture(scope="module")
def corpus_cfg(texts, tmp_path_factory) -> DataConfig:
    directory = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(texts[:40]):
        (directory / f"doc{i:02d}.py").write_text(text)
    return DataConfig(corpus=str(directory / "*.py"), cache_dir=str(tmp_path_factory.mktemp("c")),
                      vocab_size=VOCAB, max_corpus_bytes=1_000_000, val_fraction=0.15,
                      seq_len=32, seed=7)


def shards_cfg(path: str, **settings) -> DataConfig:
    return DataConfig(mode="shards", path=path, vocab_size=VOCAB, seq_len=32, seed=3,
                      **settings)


def windows_over_range(num_windows: int, seq_len: int = 4) -> TokenWindows:
    """Windows whose first input token is k * seq_len, so a window's id can be read back."""
    return TokenWindows(np.arange(num_windows * seq_len + 1, dtype=np.uint16), seq_len)


def ids_of(inputs: torch.Tensor, seq_len: int = 4) -> list[int]:
    return (inputs[:, 0] // seq_len).tolist()


# corpus mode (the demo)


def test_stdlib_corpus_is_sorted_python_files_within_the_byte_budget():
    documents = find_documents("stdlib", 200_000)
    sizes = [path.stat().st_size for path in documents]
    assert documents == sorted(documents)
    assert all(path.suffix == ".py" and "site-packages" not in path.parts for path in documents)
    assert sum(sizes[:-1]) < 200_000 <= sum(sizes)


def test_missing_and_empty_corpus_name_data_corpus(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.corpus=.*matches no files"):
        find_documents(str(tmp_path / "missing" / "*.txt"), 1000)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(ConfigError, match=r"data\.corpus=.*empty corpus"):
        find_documents(str(tmp_path / "*.txt"), 1000)


def test_corpus_mode_builds_shards_once_and_reuses_them(corpus_cfg, monkeypatch):
    train, val, tokenizer, prepared = build_loaders(corpus_cfg, micro_batch_size=4)
    inputs, targets = next(train).tensors()
    assert inputs.shape == targets.shape == (4, corpus_cfg.seq_len)
    assert inputs.dtype == torch.long and inputs.max() < tokenizer.vocab_size == VOCAB
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert len(list(val.batches(3))) == 3

    def must_not_train(*args, **kwargs):
        raise AssertionError("prepare retrained instead of reusing the cache")

    monkeypatch.setattr(prepare_module, "train_sentencepiece", must_not_train)
    assert prepare(corpus_cfg) == prepared.directories[0]


def test_corpus_of_jsonl_files_counts_and_learns_from_records(jsonl_corpus, tmp_path, capsys):
    """A corpus glob of JSONL files: each record is a document (60 in 3 files), and the
    tokenizer learns from the records' text, not from the JSON around it."""
    cfg = DataConfig(corpus=jsonl_corpus, cache_dir=str(tmp_path), vocab_size=VOCAB,
                     val_fraction=0.15, seq_len=32)
    splits = load_manifest(prepare(cfg))["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 60
    out = capsys.readouterr().out
    assert "3 files" in out and "tokenized 60 documents" in out
    vocab = next(tmp_path.glob(f"*/{prepare_module.TOKENIZER_DIR}/tokenizer.vocab"))
    pieces = [line.split("\t")[0] for line in vocab.read_text().splitlines()]
    assert '\\"' not in pieces  # JSON's escaped quote is not text


def test_too_short_validation_split_names_data_val_fraction(corpus_cfg):
    with pytest.raises(ConfigError, match=r"data\.val_fraction=.*data\.seq_len"):
        build_loaders(replace(corpus_cfg, seq_len=100_000), micro_batch_size=1)


def test_too_small_training_split_names_the_fix(corpus_cfg):
    """The hint's micro-batch size (a divisor of the one given, so the global batch still
    splits into whole micro-batches), applied, builds the loaders."""
    with pytest.raises(ConfigError, match=r"fewer than one micro-batch.*; set "
                                          r"trainer\.micro_batch_size=(\d+), or") as info:
        build_loaders(corpus_cfg, micro_batch_size=100_000)
    size = int(re.search(r"trainer\.micro_batch_size=(\d+)", str(info.value))[1])
    assert 100_000 % size == 0
    loaders = build_loaders(corpus_cfg, micro_batch_size=size)
    assert next(loaders.train).inputs.shape[0] == size
    assert len(loaders.train.samples) < min(d for d in range(size + 1, 100_001)
                                            if 100_000 % d == 0)  # the largest that fits


# windows and the sample stream


def test_windows_pack_across_shard_boundaries():
    stream = TokenStream([np.arange(0, 5), np.arange(5, 7), np.arange(7, 20)])
    windows = TokenWindows(stream, seq_len=4)
    assert len(windows) == 4
    assert [windows.window(k).tolist() for k in range(4)] == [
        list(range(k * 4, k * 4 + 5)) for k in range(4)
    ]


def test_document_ids_increment_after_each_eos():
    inputs = torch.tensor([[5, 2, 6, 7, 2, 8], [2, 2, 9, 9, 9, 9]])
    assert document_ids(inputs, eos_id=2).tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]


def test_document_ids_come_with_the_batches_when_asked_for():
    batches = TrainBatches(windows_over_range(30), 3, seed=1, eos_id=8)
    inputs, targets, ids = next(batches).tensors()
    assert ids.shape == inputs.shape and torch.equal(ids, document_ids(inputs, 8))


def test_same_seed_gives_the_same_order_and_another_seed_a_different_one():
    def first_ids(seed: int) -> list[int]:
        batches = TrainBatches(windows_over_range(50), micro_batch_size=5, seed=seed)
        return [i for _ in range(10) for i in ids_of(next(batches).inputs)]

    assert first_ids(1) == first_ids(1)
    assert first_ids(1) != first_ids(2)


def test_each_epoch_visits_every_window_exactly_once_in_a_new_order():
    # 23 windows and 5 samples per micro-batch: micro-batches straddle epoch boundaries.
    batches = TrainBatches(windows_over_range(23), micro_batch_size=5, seed=3)
    stream = [i for _ in range(23 * 3 // 5 + 1) for i in ids_of(next(batches).inputs)]
    epochs = [stream[e * 23 : (e + 1) * 23] for e in range(3)]
    assert all(sorted(epoch) == list(range(23)) for epoch in epochs)
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_see_disjoint_samples_that_together_are_the_single_process_ones(dp_size):
    windows, micro_batch_size, steps = windows_over_range(37), 3, 7
    single = TrainBatches(windows, micro_batch_size, seed=11)
    single_batches = [next(single).inputs for _ in range(steps * dp_size)]
    ranks = [TrainBatches(windows, micro_batch_size, 11, rank, dp_size) for rank in range(dp_size)]
    for step in range(steps):
        for rank, batches in enumerate(ranks):
            assert torch.equal(next(batches).inputs, single_batches[step * dp_size + rank])


def test_4_dp_ranks_x_2_workers_see_every_sample_of_an_epoch_exactly_once(shard_dir):
    train = build_loaders(shards_cfg(shard_dir), micro_batch_size=2, dp_rank=0, dp_size=4).train
    epoch = len(train.samples)
    steps = -(-epoch // 8)  # micro-steps of 4 ranks x 2 samples that cover the epoch
    windows = train.samples.sources[0]
    seen = []
    for rank in range(4):
        batches = TrainBatches(train.samples, 2, 3, rank, 4, num_workers=2)
        for step in range(steps):
            inputs = next(batches).inputs
            single = (step * 4 + rank) * 2
            seen += [(single + row, inputs[row]) for row in range(2)]
    seen = [inputs for sample, inputs in sorted(seen, key=lambda s: s[0]) if sample < epoch]
    expected = {tuple(windows.window(k)[:-1].tolist()) for k in range(epoch)}
    assert len(seen) == epoch and {tuple(s.tolist()) for s in seen} == expected


def test_resume_after_k_steps_yields_the_identical_batches_also_with_other_workers(shard_dir):
    train = build_loaders(shards_cfg(shard_dir), micro_batch_size=3, dp_rank=1, dp_size=2).train
    for _ in range(7):
        next(train)
    state = train.state_dict()
    expected = [next(train) for _ in range(6)]
    for num_workers in (0, 2):
        resumed = TrainBatches(train.samples, 3, 3, dp_rank=1, dp_size=2, num_workers=num_workers)
        resumed.load_state_dict(state)
        for want in expected:
            got = next(resumed)
            assert all(torch.equal(a, b)
                       for a, b in zip(got.tensors(), want.tensors(), strict=True))


def test_num_workers_auto_is_one_worker_on_an_accelerator_and_none_on_cpu():
    assert DataConfig().num_workers == -1
    assert DataConfig().workers(accelerator=True) == 1
    assert DataConfig().workers(accelerator=False) == 0
    assert DataConfig(num_workers=3).workers(accelerator=False) == 3
    with pytest.raises(ConfigError, match=r"data.num_workers=-2 must be -1 \(auto\)"):
        DataConfig(num_workers=-2).check()


def _fake_pin(pinned: list[torch.Tensor]):
    """A stand-in for Tensor.pin_memory (which needs CUDA): records and returns a copy."""
    def pin_memory(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        pinned.append(tensor)
        return tensor.clone()
    return pin_memory


def test_training_batches_for_an_accelerator_are_pinned_and_unchanged(shard_dir, jsonl_corpus,
                                                                       tokenizer_dir, monkeypatch):
    plain = build_loaders(shards_cfg(shard_dir), micro_batch_size=2).train
    assert not plain.pin_memory and plain.num_workers == 0  # auto on CPU
    pinned: list[torch.Tensor] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", _fake_pin(pinned))
    train = build_loaders(shards_cfg(shard_dir), micro_batch_size=2, accelerator=True).train
    assert train.pin_memory and train.num_workers == 1
    # Without workers the loader pins in the training process itself.
    direct = TrainBatches(train.samples, 2, 3, pin_memory=True)
    reference = TrainBatches(train.samples, 2, 3)
    for _ in range(3):
        got, want = next(direct), next(reference)
        assert all(torch.equal(a, b) for a, b in zip(got.tensors(), want.tensors(), strict=True))
    assert len(pinned) == 3 * 2  # inputs and targets of each batch
    streaming = DataConfig(mode="streaming", dataset=jsonl_corpus, tokenizer=tokenizer_dir,
                           vocab_size=VOCAB, seq_len=32, val_fraction=0.1)
    train_stream, val_stream, _, _ = build_loaders(streaming, 2, accelerator=True)
    assert train_stream.pin_memory and not val_stream.pin_memory
    next(train_stream)
    assert len(pinned) == 3 * 2 + 2


def test_resume_with_another_dp_size_continues_the_same_sample_stream():
    windows = windows_over_range(40)
    two = [TrainBatches(windows, 2, 5, rank, 2) for rank in range(2)]
    for _ in range(3):
        for batches in two:
            next(batches)
    one = TrainBatches(windows, 2, 5)
    one.load_state_dict(two[0].state_dict())
    single = TrainBatches(windows, 2, 5)
    for _ in range(6):
        next(single)
    assert torch.equal(next(one).inputs, next(single).inputs)


def test_validation_batches_are_fixed_and_split_over_dp_ranks():
    windows = windows_over_range(10)
    single = [ids_of(b.inputs) for b in ValBatches(windows, micro_batch_size=2).batches(4)]
    assert single == [[0, 1], [2, 3], [4, 5], [6, 7]]
    rank1 = [ids_of(b.inputs) for b in ValBatches(windows, 2, dp_rank=1, dp_size=2).batches(3)]
    assert rank1 == [[2, 3], [6, 7], [0, 1]]  # the third wraps around the 10 windows


# blending


def test_blend_realises_the_requested_mix_within_one_percent():
    sources = [windows_over_range(n) for n in (50, 7, 300)]
    blend = BlendedSamples(sources, [0.5, 0.2, 0.3], seed=1)
    for num_samples in (997, 5000, 123_457):
        mix = blend.realised_mix(num_samples)
        assert all(abs(got - want) < 0.01 for got, want in zip(mix, [0.5, 0.2, 0.3],
                                                               strict=True))
    # The small source repeats, each of its epochs a permutation of its windows.
    source, window = blend.locate(np.arange(5000))
    small = window[source == 1][:21].tolist()
    assert all(sorted(small[e * 7 : (e + 1) * 7]) == list(range(7)) for e in range(3))


def test_blend_config_reads_several_shard_directories(shard_dir, tmp_path):
    blend = [BlendSourceConfig(shard_dir, 3.0), BlendSourceConfig(shard_dir, 1.0)]
    cfg = DataConfig(mode="shards", blend=blend, vocab_size=VOCAB, seq_len=32)
    train = build_loaders(cfg, micro_batch_size=4).train
    assert [round(w, 2) for w in train.samples.weights] == [0.75, 0.25]
    assert next(train).inputs.shape == (4, 32)


# shards mode settings and errors


def test_shards_mode_needs_a_path_and_the_tokenizers_vocab_size(shard_dir):
    with pytest.raises(ConfigError, match=r"data\.mode=shards needs data\.path"):
        build_loaders(DataConfig(mode="shards"), 1)
    with pytest.raises(ConfigError, match=r"data\.vocab_size=512 but the tokenizer .* 400 ids"):
        build_loaders(replace(shards_cfg(shard_dir), vocab_size=512), 1)


def test_unfinished_shard_directory_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path=.* has no manifest\.json"):
        build_loaders(shards_cfg(str(tmp_path)), 1)


# streaming


def test_streaming_yields_the_same_packed_tokens_as_the_shard_path(shard_dir, jsonl_corpus,
                                                                  tokenizer_dir):
    from scaleforge.data_pipeline.sources import open_streaming_dataset

    windows = build_loaders(shards_cfg(shard_dir), 1).train.samples.sources[0]
    tokenizer = Tokenizer.load(tokenizer_dir)
    for split, val_windows in (("train", None), ("val", True)):
        stream = StreamingBatches(open_streaming_dataset(jsonl_corpus), tokenizer, "text", 32, 1,
                                  0.1, split)
        expected = windows if val_windows is None else build_loaders(
            shards_cfg(shard_dir), 1).val.windows
        for k in range(len(expected)):
            inputs, targets = next(stream).tensors()
            assert inputs[0].tolist() == expected.window(k)[:-1].tolist()
            assert targets[0].tolist() == expected.window(k)[1:].tolist()


def test_a_source_without_a_window_hint_followed_gives_it_windows():
    """A blended source shorter than a window: the hint's data.seq_len (the largest divisor of
    the current that gives it a window, so the global batch still splits) applied, it blends."""
    long, short = np.arange(1000), np.arange(1000, 1020)  # 20 tokens < 33
    with pytest.raises(ConfigError, match=r"data source 1 holds 20 training tokens, fewer than "
                                          r"data\.seq_len \+ 1 = 33; set data\.seq_len=16, or "
                                          r"add text"):
        BlendedSamples([TokenWindows(long, 32), TokenWindows(short, 32)], [0.5, 0.5], seed=0)
    blend = BlendedSamples([TokenWindows(long, 16), TokenWindows(short, 16)], [0.5, 0.5], seed=0)
    assert len(blend.sources[1]) == 1
    with pytest.raises(ConfigError, match=r"holds 2 training tokens.*; add text"):
        BlendedSamples([TokenWindows(long, 32), TokenWindows(np.arange(2), 32)], [1, 1], seed=0)


def test_streaming_empty_validation_split_hint_followed_holds_out_windows(jsonl_corpus,
                                                                          tokenizer_dir):
    """The empty streaming validation split's hint names the data.val_fraction that holds out
    4 windows (from the documents of lowest hash position); applied, validation reads them."""
    from scaleforge.data_pipeline.sources import open_streaming_dataset

    tokenizer = Tokenizer.load(tokenizer_dir)

    def stream(val_fraction: float) -> StreamingBatches:
        return StreamingBatches(open_streaming_dataset(jsonl_corpus), tokenizer, "text", 32, 1,
                                val_fraction, "val")

    with pytest.raises(ConfigError, match=r"data\.val_fraction=1e-06: the streaming val split "
                                          r"holds fewer .*; set data\.val_fraction=") as info:
        list(stream(1e-6).batches(1))
    fraction = float(re.search(r"set data\.val_fraction=([0-9.e-]+) ", str(info.value))[1])
    windows = list(itertools.islice(stream(fraction)._one_pass([], 0, 0), 4))
    assert len(windows) == 4
    assert 1e-6 < fraction < 0.5


def test_streaming_resumes_exactly_and_splits_by_node(jsonl_corpus, tokenizer_dir):
    from scaleforge.data_pipeline.sources import open_streaming_dataset

    tokenizer = Tokenizer.load(tokenizer_dir)

    def stream(rank: int = 0, size: int = 1) -> StreamingBatches:
        return StreamingBatches(open_streaming_dataset(jsonl_corpus), tokenizer, "text", 32, 2,
                                0.1, "train", rank, size)

    original = stream()
    for _ in range(9):
        next(original)
    state = original.state_dict()
    expected = [next(original).inputs for _ in range(5)]
    resumed = stream()
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed).inputs, want) for want in expected)
    # Two nodes read disjoint rows (the three files are shared out between them).
    rows = [[r["text"] for r in stream(rank, 2).dataset] for rank in range(2)]
    assert rows[0] and rows[1] and not set(rows[0]) & set(rows[1])


def test_streaming_mode_through_build_loaders(tmp_path, jsonl_corpus, tokenizer_dir):
    cfg = DataConfig(mode="streaming", dataset=jsonl_corpus, tokenizer=tokenizer_dir,
                     vocab_size=VOCAB, seq_len=32, val_fraction=0.1)
    train, val, tokenizer, prepared = build_loaders(cfg, micro_batch_size=2)
    assert next(train).inputs.shape == (2, 32) and prepared.directories == ()
    first = [b.inputs for b in val.batches(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, [b.inputs for b in val.batches(2)],
                                                 strict=True))
    assert isinstance(Path(tokenizer.path), Path)


def test_streaming_from_a_save_to_disk_directory_equals_streaming_from_jsonl(
    tmp_path, texts, jsonl_corpus, tokenizer_dir
):
    import datasets

    from scaleforge.data_pipeline.sources import open_streaming_dataset

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    tokenizer = Tokenizer.load(tokenizer_dir)
    streams = [StreamingBatches(open_streaming_dataset(spec), tokenizer, "text", 32, 4, 0.1)
               for spec in (str(tmp_path / "ds"), jsonl_corpus)]
    for _ in range(10):
        assert torch.equal(next(streams[0]).inputs, next(streams[1]).inputs)


# per-document attention: the loaders hand over document ids (data.document_masking)


@pytest.mark.parametrize("mode", ["shards", "streaming"])
def test_document_masking_gives_every_train_and_val_batch_its_document_ids(
    mode, shard_dir, jsonl_corpus, tokenizer_dir
):
    cfg = (shards_cfg(shard_dir, document_masking=True) if mode == "shards" else
           DataConfig(mode="streaming", dataset=jsonl_corpus, tokenizer=tokenizer_dir,
                      vocab_size=VOCAB, seq_len=32, val_fraction=0.1, document_masking=True))
    train, val, tokenizer, _ = build_loaders(cfg, micro_batch_size=4)
    batches = [next(train) for _ in range(30)] + list(val.batches(2))
    for batch in batches:
        assert torch.equal(batch.document_ids, document_ids(batch.inputs, tokenizer.eos_id))
    # Documents of up to 3,000 characters: 30 x 4 windows of 32 tokens cross boundaries.
    assert any(batch.document_ids.max() > 0 for batch in batches)
    plain = build_loaders(replace(cfg, document_masking=False), micro_batch_size=4)
    first = next(plain.train)
    assert first.document_ids is None and torch.equal(first.inputs, batches[0].inputs)


def test_streaming_with_document_ids_resumes_at_the_same_batch(jsonl_corpus, tokenizer_dir):
    from scaleforge.data_pipeline.sources import open_streaming_dataset

    tokenizer = Tokenizer.load(tokenizer_dir)

    def stream() -> StreamingBatches:
        return StreamingBatches(open_streaming_dataset(jsonl_corpus), tokenizer, "text", 32, 2,
                                0.1, eos_id=tokenizer.eos_id)

    run = stream()
    for _ in range(3):
        next(run)
    resumed = stream()
    resumed.load_state_dict(run.state_dict())
    expected, actual = next(run), next(resumed)
    assert actual.document_ids is not None
    assert all(torch.equal(a, b)
               for a, b in zip(actual.tensors(), expected.tensors(), strict=True))


def test_empty_shards_validation_split_names_sf_preprocess_val_fraction(shard_dir):
    with pytest.raises(ConfigError) as info:
        build_loaders(replace(shards_cfg(shard_dir), seq_len=100_000), 1)
    message = str(info.value)
    assert "rerun sf-preprocess shards with val_fraction=0.5" in message
    assert "held out val_fraction=0.1" in message and "data.val_fraction" not in message


def test_val_fraction_advice_holds_out_the_tokens_asked_for_and_never_less_than_now(texts):
    """Computed from the recorded hash positions: the advised fraction puts at least the
    tokens asked for in validation, is not below the fraction that held out too few, and
    overshoots by the rounding to two significant figures only."""
    documents = [[hash_position(text), len(text) // 4] for text in texts]
    for needed, current in ((1000, 0.01), (5000, 0.01), (200, 0.3)):
        fraction = val_fraction_for(needed, current, lowest_documents([documents]),
                                    sum(t for _, t in documents), len(documents))
        held = sum(tokens for position, tokens in documents if position < fraction)
        assert held >= needed and fraction >= current, (needed, fraction, held)
        ordered = sorted(documents)
        cumulative = np.cumsum([tokens for _, tokens in ordered])
        threshold = ordered[int(np.searchsorted(cumulative, needed))][0]
        assert fraction <= max(current, 1.1 * threshold + 1e-4), (fraction, threshold)
    # not enough text in the corpus at all: at most half of it
    assert val_fraction_for(10**9, 0.01, lowest_documents([documents]), 1, 60) == 0.5
    # manifests without recorded positions: an estimate, at least twice the fraction now
    assert val_fraction_for(8200, 0.01, [], 100_000, 494) == 0.17
    assert val_fraction_for(100, 0.01, [], 10**9, 494) == 0.02


