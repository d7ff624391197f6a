"""`sf-preprocess shards`: tokenize an input in parallel worker processes into token shards.

The work is cut into units: runs of consecutive input files of at least `unit_bytes`
together (a Hugging Face dataset is a unit of its own). A worker reads the unit's
documents in order, sends each to the train or validation split by its text (split.py),
tokenizes it and appends its ids and an EOS to the split's current shard,
`<split>/<unit:05d>-<part:03d>.bin` (uint16 or uint32, with a `.idx.npy` document index);
a shard closes once it holds `shard_tokens` tokens. So the shards depend on the input and
the settings only, never on the number of workers or on interruptions.

A finished unit leaves a record in `.partial/`, written after its shards; a rerun skips the
units that have one, so an interrupted run resumes where it stopped and ends with the
same files. `manifest.json` is written last, from the records, so a directory without one
is never mistaken for a finished one.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scaleforge.data_pipeline.manifest import FORMAT_VERSION, MANIFEST, SPLITS
from scaleforge.data_pipeline.sources import Document, read_documents, resolve_inputs
from scaleforge.data_pipeline.split import hash_position, is_validation, lowest_documents
from scaleforge.data_pipeline.token_file import index_path, token_dtype
from scaleforge.data_pipeline.tokenizer import Tokenizer, file_sha256
from scaleforge.errors import ConfigError

PARTIAL = ".partial"
TOKENIZER_DIR = "tokenizer"
# Documents tokenized per call: amortizes the call overhead, keeps memory small.
_ENCODE_BATCH = 256


@dataclass
class ShardsJob:
    """The settings of `sf-preprocess shards` (each is a key=value argument)."""

    # Text to tokenize: a glob of .txt (a file is a document), .jsonl(.gz) or .parquet
    # files, or a save_to_disk directory.
    input: str
    tokenizer: str  # a tokenizer directory (sf-preprocess tokenizer) or a tokenizer.json
    out: str  # the shards' directory: train/, val/, the tokenizer, manifest.json
    text_field: str = "text"  # the field of a jsonl/parquet record that holds the text
    workers: int = 2  # tokenizing processes (0 or 1: in this process)
    # Share of the documents held out for validation, chosen by a hash of each text.
    val_fraction: float = 0.01
    shard_tokens: int = 1 << 28  # tokens per shard file
    unit_bytes: int = 1 << 26  # input bytes per unit of work (a unit resumes as a whole)
    progress: bool = True  # a progress bar


def write_shards(job: ShardsJob, inputs: list[str] | None = None) -> dict:
    """Tokenize `job.input` (or the given `inputs`, files in order) into shards under
    `job.out` and return the manifest.

    Reruns with the same settings resume an interrupted run, or return at once when the
    manifest already exists. Raises ConfigError for bad settings or inputs, naming them.
    """
    _check_job(job)
    units = group_units(inputs if inputs is not None else resolve_inputs(job.input),
                        job.unit_bytes)
    out = Path(job.out)
    tokenizer_file = _store_tokenizer(job, out)
    tokenizer = Tokenizer.load(tokenizer_file)
    settings = {
        "format": FORMAT_VERSION,
        "source": {"input": job.input, "text_field": job.text_field, "units": units},
        "tokenizer": {
            "file": str(tokenizer_file.relative_to(out)),
            "sha256": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
        },
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "val_fraction": job.val_fraction,
        "shard_tokens": job.shard_tokens,
    }
    finished = _finished_manifest(out, settings)
    if finished is not None:
        return finished
    partial = out / PARTIAL
    _claim_partial(partial, settings)
    pending = [u for u in range(len(units)) if not _record_path(partial, u).exists()]
    _run_units(job, settings, units, pending, partial)
    return _write_manifest(out, settings, [_load_record(partial, u) for u in range(len(units))])


def tokenize_unit(out: str, settings: dict, unit_index: int, threads: int | None = 1) -> dict:
    """Tokenize one unit into its shards and write its record; returns the record.

    Runs in a worker process (one tokenizer thread each) or, with `threads` None, in this
    one on every CPU. The record lists, per split, the shards written with their
    token and document counts and checksums.
    """
    out_dir = Path(out)
    tokenizer = _worker_tokenizer(out_dir / settings["tokenizer"]["file"])
    unit = settings["source"]["units"][unit_index]
    writers = {
        split: _ShardWriter(out_dir, split, unit_index, settings) for split in SPLITS
    }
    batch: list[Document] = []
    lowest: list[list[float]] = []
    for path in unit:
        for document in read_documents(path, settings["source"]["text_field"]):
            batch.append(document)
            if len(batch) == _ENCODE_BATCH:
                lowest = _write_batch(batch, tokenizer, writers, settings["val_fraction"],
                                      threads, lowest)
                batch = []
    lowest = _write_batch(batch, tokenizer, writers, settings["val_fraction"], threads, lowest)
    record = {"unit": unit, "splits": {split: writers[split].close() for split in SPLITS},
              "lowest_documents": lowest}
    _atomic_write_json(_record_path(out_dir / PARTIAL, unit_index), record)
    return record


class _ShardWriter:
    """Appends documents to `<split>/<unit>-<part>.bin` files of about shard_tokens tokens."""

    def __init__(self, out: Path, split: str, unit_index: int, settings: dict):
        self.out = out
        self.split = split
        self.unit_index = unit_index
        self.dtype = np.dtype(settings["dtype"])
        self.eos_id = settings["tokenizer"]["eos_id"]
        self.vocab_size = settings["tokenizer"]["vocab_size"]
        self.shard_tokens = settings["shard_tokens"]
        self.shards: list[dict] = []
        self._stream: io.BufferedWriter | None = None
        self._offsets = [0]

    def add(self, ids: list[int], where: str) -> None:
        """Append one document's ids and an EOS; `where` names it in errors."""
        tokens = np.asarray([*ids, self.eos_id], dtype=np.int64)
        if tokens.max() >= self.vocab_size or tokens.min() < 0:
            raise ConfigError(
                f"{where}: the tokenizer produced an id outside [0, {self.vocab_size}); the "
                "tokenizer file is inconsistent, retrain it"
            )
        if self._stream is None:
            self._path().parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(self._temporary(), "wb")
        tokens.astype(self.dtype).tofile(self._stream)
        self._offsets.append(self._offsets[-1] + len(tokens))
        if self._offsets[-1] >= self.shard_tokens:
            self._flush()

    def close(self) -> list[dict]:
        if len(self._offsets) > 1 or not self.shards:
            self._flush()
        return self.shards

    def _path(self) -> Path:
        return self.out / f"{self.split}/{self.unit_index:05d}-{len(self.shards):03d}.bin"

    def _temporary(self) -> Path:
        return self._path().with_name(self._path().name + ".tmp")

    def _flush(self) -> None:
        path = self._path()
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._stream is None:  # a unit with no document of this split: an empty shard
            self._temporary().write_bytes(b"")
        else:
            self._stream.close()
            self._stream = None
        # Written under a temporary name and renamed, so a killed worker leaves no shard
        # that looks whole; the unit's record (written after) is what marks it finished.
        os.replace(self._temporary(), path)
        _atomic_write_bytes(index_path(path), _npy_bytes(np.asarray(self._offsets, np.int64)))
        self.shards.append({
            "file": str(path.relative_to(self.out)),
            "tokens": self._offsets[-1],
            "documents": len(self._offsets) - 1,
            "sha256": file_sha256(path),
            "index_sha256": file_sha256(index_path(path)),
        })
        self._offsets = [0]


def _write_batch(batch: list[Document], tokenizer: Tokenizer, writers: dict,
                 val_fraction: float, threads: int | None,
                 lowest: list[list[float]]) -> list[list[float]]:
    """Write `batch` to its splits; return `lowest` updated with its documents' [hash
    position, tokens] (`split.lowest_documents`)."""
    if not batch:
        return lowest
    encoded = tokenizer.encode_many([d.text for d in batch], num_threads=threads)
    positions = []
    for document, ids in zip(batch, encoded, strict=True):
        split = "val" if is_validation(document.text, val_fraction) else "train"
        writers[split].add(ids, document.where)
        positions.append([hash_position(document.text), len(ids) + 1])
    return lowest_documents([lowest, positions])


def _run_units(job: ShardsJob, settings: dict, units: list[list[str]], pending: list[int],
               partial: Path) -> None:
    started = time.perf_counter()
    documents = tokens = 0
    bar = tqdm(total=len(units), initial=len(units) - len(pending), unit="file",
               disable=not job.progress, desc="shards")
    arguments = [(job.out, settings, u) for u in pending]
    results: Iterator[dict]
    if job.workers <= 1:
        results = (tokenize_unit(*a, threads=None) for a in arguments)
        pool = None
    else:
        # fork: workers start at once and need no importable __main__; each loads its own
        # tokenizer after the fork, so no tokenizer thread pool crosses it.
        pool = multiprocessing.get_context("fork").Pool(job.workers)
        results = pool.imap_unordered(_tokenize_unit_star, arguments)
    try:
        for record in results:
            for split in SPLITS:
                documents += sum(s["documents"] for s in record["splits"][split])
                tokens += sum(s["tokens"] for s in record["splits"][split])
            seconds = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{documents / seconds:,.0f} docs/s, {tokens / seconds:,.0f} tok/s")
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


def group_units(inputs: list[str], unit_bytes: int) -> list[list[str]]:
    """Consecutive inputs grouped into units of at least `unit_bytes` on disk (the last may
    be smaller); a Hugging Face dataset (not a file) is a unit of its own."""
    units: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for path in inputs:
        if not os.path.isfile(path):
            units += [current, [path]] if current else [[path]]
            current, current_bytes = [], 0
            continue
        current.append(path)
        current_bytes += _size(path)
        if current_bytes >= unit_bytes:
            units.append(current)
            current, current_bytes = [], 0
    return units + [current] if current else units


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as error:
        raise ConfigError(
            f"cannot read {path} ({error.strerror}); fix the file or narrow the input glob so "
            "it no longer matches it"
        ) from error


def _tokenize_unit_star(arguments: tuple[str, dict, int]) -> dict:
    return tokenize_unit(*arguments)


def _write_manifest(out: Path, settings: dict, records: list[dict]) -> dict:
    splits = {}
    for split in SPLITS:
        shards = [shard for record in records for shard in record["splits"][split]]
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "shards": shards,
        }
    if splits["train"]["documents"] + splits["val"]["documents"] == 0:
        raise ConfigError(
            f"input={settings['source']['input']!r} holds no documents (every matched file is "
            "empty); point input at files with text"
        )
    if splits["train"]["documents"] == 0:
        raise ConfigError(
            f"val_fraction={settings['val_fraction']} sent every document to validation; "
            "lower val_fraction"
        )
    manifest = {**settings, "splits": splits}
    if all("lowest_documents" in record for record in records):  # older records lack it
        manifest["lowest_documents"] = lowest_documents(
            [record["lowest_documents"] for record in records])
    _atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return manifest


def _check_job(job: ShardsJob) -> None:
    if not 0 <= job.val_fraction < 1:
        raise ConfigError(f"val_fraction={job.val_fraction} must lie in [0, 1), e.g. 0.01")
    if job.shard_tokens <= 0:
        raise ConfigError(f"shard_tokens={job.shard_tokens} must be positive, e.g. 268435456")
    if job.unit_bytes <= 0:
        raise ConfigError(f"unit_bytes={job.unit_bytes} must be positive, e.g. 67108864")
    if job.workers < 0:
        raise ConfigError(f"workers={job.workers} must be >= 0 (0 or 1: in this process)")


def _store_tokenizer(job: ShardsJob, out: Path) -> Path:
    """Copy the tokenizer file next to the shards, so they carry what decodes them."""
    source = Tokenizer.load(job.tokenizer).path
    stored = out / TOKENIZER_DIR / source.name
    if stored.exists() and file_sha256(stored) != file_sha256(source):
        raise ConfigError(
            f"out={job.out!r} was started with another tokenizer ({stored}); use a new out "
            f"directory for tokenizer={job.tokenizer!r}, or delete {job.out}"
        )
    stored.parent.mkdir(parents=True, exist_ok=True)
    if not stored.exists():
        shutil.copyfile(source, stored)
    return stored


def _finished_manifest(out: Path, settings: dict) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if {k: manifest.get(k) for k in settings} != settings:
        raise ConfigError(
            f"out={str(out)!r} already holds shards made with other settings (see {path}); "
            "choose a new out directory or delete it"
        )
    return manifest


def _claim_partial(partial: Path, settings: dict) -> None:
    """Start a run, or resume one only if it had the same settings."""
    settings_path = partial / "settings.json"
    if settings_path.exists():
        if json.loads(settings_path.read_text()) != settings:
            raise ConfigError(
                f"{partial.parent} holds an interrupted run with other settings (see "
                f"{settings_path}); rerun it with those settings, or delete {partial.parent}"
            )
        return
    partial.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(settings_path, settings)


def _record_path(partial: Path, unit_index: int) -> Path:
    return partial / f"{unit_index:05d}.json"


def _load_record(partial: Path, unit_index: int) -> dict:
    return json.loads(_record_path(partial, unit_index).read_text())


_TOKENIZERS: dict[Path, Tokenizer] = {}


def _worker_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer at `path`, loaded once per worker process rather than once per unit."""
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = Tokenizer.load(path)
    return _TOKENIZERS[path]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _atomic_write_json(path: Path, value: dict) -> None:
    _atomic_write_bytes(path, json.dumps(value, indent=1).encode())
