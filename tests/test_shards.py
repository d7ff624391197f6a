"""Sources, tokenizers, sf-preprocess shards (contents, manifest, resume) and their errors."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scaleforge.data_pipeline.manifest import load_manifest, load_shard_tokenizer, open_split
from scaleforge.data_pipeline.shards import ShardsJob, write_shards
from scaleforge.data_pipeline.sources import read_documents, resolve_inputs
from scaleforge.data_pipeline.split import is_validation
from scaleforge.data_pipeline.token_file import read_document_index
from scaleforge.data_pipeline.tokenizer import Tokenizer, train_sentencepiece
from scaleforge.errors import ConfigError

CODE = (
    "def f(x):\n"
    "    if x:\n"
    "\treturn x  \n"
    "\n\n"
    "        # deep indent, trailing spaces   \n"
    "  leading = 'two spaces'\r\n"
    "s = 'héllo ✓ 😀 日本'\n"
)


def shard_tokens(directory: str, split: str) -> np.ndarray:
    manifest = load_manifest(Path(directory))
    streams = open_split(Path(directory), manifest, split, verify=True)
    return np.concatenate([np.asarray(s) for s in streams]) if streams else np.zeros(0)


def job(input: str, tokenizer: str, out: Path, **settings) -> ShardsJob:
    return ShardsJob(input=input, tokenizer=tokenizer, out=str(out),
                     **{"workers": 0, "val_fraction": 0.1, "progress": False, **settings})


# sources


def test_txt_jsonl_gz_and_parquet_sources_yield_the_same_documents(tmp_path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    some = texts[:5]
    for i, text in enumerate(some):
        (tmp_path / f"doc{i}.txt").write_text(text)
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as stream:
        stream.writelines(json.dumps({"body": t}) + "\n" for t in some)
    pq.write_table(pa.table({"body": some}), tmp_path / "docs.parquet")

    def read(pattern: str) -> list[str]:
        return [d.text for u in resolve_inputs(str(tmp_path / pattern))
                for d in read_documents(u, "body")]

    assert read("*.txt") == read("*.jsonl.gz") == read("*.parquet") == some


def test_hf_dataset_directory_is_a_source(tmp_path, texts):
    import datasets

    datasets.Dataset.from_dict({"text": texts[:4]}).save_to_disk(str(tmp_path / "ds"))
    units = resolve_inputs(str(tmp_path / "ds"))
    assert [d.text for d in read_documents(units[0])] == texts[:4]


def test_missing_text_field_names_file_line_and_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(ConfigError, match=r"a\.jsonl:2 has no field text_field='text'.*content"):
        list(read_documents(str(tmp_path / "a.jsonl")))


def test_missing_parquet_column_names_file_and_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(ConfigError, match=r"x\.parquet has no column text_field='text' .*content"):
        list(read_documents(str(tmp_path / "x.parquet")))


def test_bad_json_line_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ConfigError, match=r"a\.jsonl:2 is not a JSON object"):
        list(read_documents(str(tmp_path / "a.jsonl")))


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match=r"cannot read .*broken\.jsonl\.gz"):
        list(read_documents(str(tmp_path / "broken.jsonl.gz")))


def test_unmatched_input_says_what_to_give(tmp_path):
    with pytest.raises(ConfigError, match=r"input=.*matches no files"):
        resolve_inputs(str(tmp_path / "*.jsonl"))


# tokenizers


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_round_trips_code_and_has_bos_eos_pad(tmp_path, texts, model_type):
    tokenizer = Tokenizer.load(train_sentencepiece(texts, 400, tmp_path, model_type))
    for text in (CODE, texts[0]):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    assert tokenizer.vocab_size == 400


def test_hf_tokenizer_json_round_trips_behind_the_same_interface(tmp_path, texts):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    rust.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.load(tmp_path)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    for text in (CODE, texts[1]):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_many([CODE, texts[1]]) == [tokenizer.encode(CODE),
                                                      tokenizer.encode(texts[1])]


# shards


def test_shards_equal_direct_tokenization_with_eos_between_documents(shard_dir, texts,
                                                                     tokenizer_dir):
    tokenizer = Tokenizer.load(tokenizer_dir)
    for split, wanted in (("train", False), ("val", True)):
        documents = [t for t in texts if is_validation(t, 0.1) == wanted]
        expected = [i for t in documents for i in [*tokenizer.encode(t), tokenizer.eos_id]]
        assert shard_tokens(shard_dir, split).tolist() == expected
    manifest = load_manifest(Path(shard_dir))
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 60
    assert len(manifest["splits"]["train"]["shards"]) > 3  # shard_tokens cut files
    first = Path(shard_dir) / manifest["splits"]["train"]["shards"][0]["file"]
    offsets = read_document_index(first)
    assert offsets[0] == 0 and offsets[-1] == manifest["splits"]["train"]["shards"][0]["tokens"]


def test_train_and_val_never_share_a_document_even_a_duplicated_one(tmp_path, texts,
                                                                    tokenizer_dir):
    # The same 20 documents appear in two files: each must land in one split both times.
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                        for t in texts[:20]))
    write_shards(job(str(tmp_path / "*.jsonl"), tokenizer_dir, tmp_path / "out",
                     val_fraction=0.3, unit_bytes=1))
    tokenizer = Tokenizer.load(tokenizer_dir)

    def documents(split: str) -> set[tuple[int, ...]]:
        tokens = shard_tokens(str(tmp_path / "out"), split).tolist()
        cut = [i for i, t in enumerate(tokens) if t == tokenizer.eos_id]
        return {tuple(tokens[a + 1 : b]) for a, b in zip([-1, *cut], cut, strict=False)}

    train, val = documents("train"), documents("val")
    assert train and val and not train & val


def test_manifest_checksum_catches_a_flipped_byte(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    manifest = load_manifest(copy)
    shard = copy / manifest["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[7] ^= 0x01
    shard.write_bytes(bytes(data))
    open_split(copy, manifest, "train", verify=False)  # sizes still match
    with pytest.raises(ConfigError, match=rf"shard .*{shard.name} is corrupt: sha256"):
        open_split(copy, manifest, "train", verify=True)


def test_truncated_shard_is_named(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    manifest = load_manifest(copy)
    shard = copy / manifest["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ConfigError, match=rf"shard .*{shard.name} is \d+ bytes but the manifest"):
        open_split(copy, manifest, "train", verify=False)


def test_token_ids_beyond_the_vocabulary_are_named(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    manifest = load_manifest(copy)
    entry = manifest["splits"]["train"]["shards"][0]
    shard = copy / entry["file"]
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[5] = 9999
    tokens.tofile(shard)
    from scaleforge.data_pipeline.tokenizer import file_sha256

    entry["sha256"] = file_sha256(shard)  # a consistent manifest: only the range check is left
    with pytest.raises(ConfigError, match=rf"shard .*{shard.name}: token 5 has id 9999, beyond"):
        open_split(copy, manifest, "train", verify=True)


def test_a_swapped_tokenizer_does_not_match_the_manifest(shard_dir, tmp_path, texts):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    manifest = load_manifest(copy)
    train_sentencepiece(texts, 420, tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / "tokenizer.model", copy / manifest["tokenizer"]["file"])
    with pytest.raises(ConfigError, match=r"is not the one the shards in .* were written with"):
        load_shard_tokenizer(copy, manifest)


def test_resuming_into_a_directory_started_with_another_tokenizer_fails(shard_dir, tmp_path,
                                                                       texts, jsonl_corpus):
    train_sentencepiece(texts, 420, tmp_path / "other")
    with pytest.raises(ConfigError, match=r"out=.*was started with another tokenizer"):
        write_shards(job(jsonl_corpus, str(tmp_path / "other"), Path(shard_dir)))


def test_empty_source_is_rejected(tmp_path, tokenizer_dir):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"input=.*holds no documents"):
        write_shards(job(str(tmp_path / "*.jsonl"), tokenizer_dir, tmp_path / "out"))


def test_interrupted_preprocessing_resumes_and_produces_identical_shards(
    shard_dir, jsonl_corpus, tokenizer_dir, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(shard_dir, out)
    # Rewind to a killed run: no manifest, two of three units unrecorded, one of them with
    # a half-written shard under its temporary name and a stale finished-looking file.
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()
    partial = out / ".partial"
    partial.mkdir()
    settings = {k: v for k, v in manifest.items() if k not in ("splits", "lowest_documents")}
    (partial / "settings.json").write_text(json.dumps(settings))
    record_units = {"unit": manifest["source"]["units"][0], "splits": {
        split: [s for s in manifest["splits"][split]["shards"] if s["file"].split("/")[1]
                .startswith("00000-")] for split in ("train", "val")}}
    (partial / "00000.json").write_text(json.dumps(record_units))
    unit1 = sorted((out / "train").glob("00001-*.bin"))
    unit1[0].write_bytes(b"\x01\x02")
    (out / "train" / "00002-000.bin.tmp").write_bytes(b"\x00" * 5)
    resumed = write_shards(job(jsonl_corpus, tokenizer_dir, out, workers=2, shard_tokens=20_000,
                               unit_bytes=1))
    # unit 0's record, written as before the hash positions were recorded, has none: the
    # manifest then has none either (the val_fraction advice falls back to an estimate)
    assert resumed == {k: v for k, v in manifest.items() if k != "lowest_documents"}
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(str(out), split), shard_tokens(shard_dir, split))
    assert not partial.exists()


def test_shards_do_not_depend_on_the_number_of_workers(shard_dir, jsonl_corpus, tokenizer_dir,
                                                       tmp_path):
    manifest = write_shards(job(jsonl_corpus, tokenizer_dir, tmp_path / "one", workers=0,
                                shard_tokens=20_000, unit_bytes=1))
    assert manifest["splits"] == load_manifest(Path(shard_dir))["splits"]


@pytest.mark.slow
def test_killed_sf_preprocess_resumes_to_the_same_files(tmp_path, texts, tokenizer_dir):
    import signal
    import subprocess
    import time

    from commands import BIN, run_tool

    for part in range(40):
        (tmp_path / f"part{part:02d}.jsonl").write_text(
            "".join(json.dumps({"text": t * 4}) + "\n" for t in texts))
    reference = write_shards(job(str(tmp_path / "*.jsonl"), tokenizer_dir, tmp_path / "ref",
                                 unit_bytes=1))
    out = tmp_path / "out"
    arguments = ["shards", f"input={tmp_path / '*.jsonl'}", f"tokenizer={tokenizer_dir}",
                 f"out={out}", "workers=1", "val_fraction=0.1", "unit_bytes=1", "progress=false"]
    process = subprocess.Popen([str(BIN / "sf-preprocess"), *arguments])
    while not (out / ".partial" / "00003.json").exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    assert run_tool("sf-preprocess", *arguments, cwd=tmp_path).returncode == 0
    resumed = load_manifest(out)
    assert resumed["splits"] == reference["splits"]
