"""Read raw documents from local files or Hugging Face datasets, one text per document.

An input is a glob of .txt (one file is one document), .jsonl / .jsonl.gz (one JSON object
per line) and .parquet files (one row per document), or a Hugging Face dataset: a local
directory written by `Dataset.save_to_disk`, or a hub name read with `streaming=True`.
JSON and parquet documents take their text from a named field. Every problem (a file that
cannot be read, a line that is not JSON, a missing field, no documents at all) raises a
ConfigError naming the file and line; nothing is skipped silently.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from scaleforge.errors import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet", ".py")
# Rows read from a parquet file at a time: bounded memory on files of any size.
_PARQUET_BATCH_ROWS = 8192


class Document(NamedTuple):
    """One document's text and where it came from ("file:line" or "file:row"), for errors."""

    text: str
    where: str


def resolve_inputs(spec: str, setting: str = "input") -> list[str]:
    """The inputs a spec names, sorted: each matched file, or the spec itself when it
    is a Hugging Face dataset (a save_to_disk directory or a hub name).

    Raises ConfigError naming `setting` when a glob matches nothing readable.
    """
    expanded = os.path.expanduser(spec)
    if is_hf_dataset_dir(expanded):
        return [expanded]
    matches = sorted(p for p in glob.glob(expanded, recursive=True) if not os.path.isdir(p))
    if matches:
        unsupported = [p for p in matches if not p.endswith(FILE_SUFFIXES)]
        if unsupported:
            raise ConfigError(
                f"{setting}={spec!r} matches {unsupported[0]}, which is none of "
                f"{', '.join(FILE_SUFFIXES)}; narrow the glob to supported files"
            )
        return matches
    if _looks_like_hub_name(spec):
        return [spec]
    raise ConfigError(
        f"{setting}={spec!r} matches no files; give a glob such as 'data/**/*.jsonl.gz', a "
        "directory written by datasets' save_to_disk, or a Hugging Face hub dataset name"
    )


def read_documents(unit: str, text_field: str = "text") -> Iterator[Document]:
    """The documents of one input from resolve_inputs, in order; `text_field` names the text
    of JSON and parquet records and Hugging Face rows. A file of another suffix is read as
    one plain-text document."""
    if unit.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_jsonl(unit, text_field)
    elif unit.endswith(".parquet"):
        yield from _read_parquet(unit, text_field)
    elif is_hf_dataset_dir(unit) or (_looks_like_hub_name(unit) and not os.path.exists(unit)):
        yield from read_hf_rows(open_hf_dataset(unit), unit, text_field)
    else:  # any other file is one plain-text document
        yield Document(_read_text_file(unit), unit)


def is_hf_dataset_dir(path: str) -> bool:
    """True for a directory written by `datasets.Dataset.save_to_disk`."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json")
    )


def open_hf_dataset(spec: str, split: str = "train") -> Dataset | IterableDataset:
    """A Hugging Face dataset: a save_to_disk directory (its `split` when it holds several),
    or a hub name opened with streaming=True so nothing is downloaded up front."""
    import datasets

    if is_hf_dataset_dir(spec):
        dataset = datasets.load_from_disk(spec)
        return dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
    try:
        return datasets.load_dataset(spec, split=split, streaming=True)
    except Exception as error:  # the hub client raises many types; all mean "not readable"
        raise ConfigError(
            f"dataset {spec!r} could not be opened ({type(error).__name__}: {error}); give a "
            "local file glob, a save_to_disk directory, or a hub name reachable from here"
        ) from error


def read_hf_rows(rows: Iterable[object], where: str, text_field: str) -> Iterator[Document]:
    """Documents from an iterable of dict rows (a Dataset or an IterableDataset)."""
    for number, row in enumerate(rows):
        yield Document(_field(row, text_field, f"{where}:row {number}"), f"{where}:row {number}")


def _read_text_file(path: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError as error:
        raise _unreadable(path, error) from error


def read_jsonl(path: str) -> Iterator[tuple[str, object]]:
    """(`file:line`, its parsed JSON) for every non-empty line of a .jsonl or .jsonl.gz file
    (bytes that are not UTF-8 replaced); ConfigError naming the line that is not JSON, or
    the file that cannot be read."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(
                        f"{where} is not a JSON object ({error.msg}); fix or remove that line"
                    ) from error
                yield where, record
    except (OSError, EOFError) as error:
        raise _unreadable(path, error) from error


def _read_jsonl(path: str, text_field: str) -> Iterator[Document]:
    for where, record in read_jsonl(path):
        yield Document(_field(record, text_field, where), where)


def _read_parquet(path: str, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as error:
        raise _unreadable(path, error) from error
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise ConfigError(
            f"{path} has no column text_field={text_field!r} (columns: {', '.join(columns)}); "
            "set text_field to the column that holds the text"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield Document(_as_text(text, text_field, f"{path}:row {row}"), f"{path}:row {row}")
            row += 1


def _field(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise ConfigError(
            f"{where} has no field text_field={text_field!r} (it has: {fields}); set text_field "
            "to the field that holds the text"
        )
    return _as_text(record[text_field], text_field, where)


def _as_text(value: object, text_field: str, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: text_field={text_field!r} holds {type(value).__name__}, not text; set "
            "text_field to a string field"
        )
    return value


def _unreadable(path: str, error: Exception) -> ConfigError:
    reason = getattr(error, "strerror", None) or str(error)
    return ConfigError(
        f"cannot read {path} ({reason}); fix the file or narrow the input glob so it no longer "
        "matches it"
    )


def _looks_like_hub_name(spec: str) -> bool:
    """`owner/name` or `name`: no glob characters, no path prefix, no file suffix."""
    return (
        not any(c in spec for c in "*?[")
        and not spec.startswith((".", "/", "~"))
        and not spec.endswith(FILE_SUFFIXES)
        and spec.count("/") <= 1
    )


def open_streaming_dataset(spec: str, setting: str = "data.dataset") -> IterableDataset:
    """An IterableDataset over `spec`: a hub name or save_to_disk directory (as
    open_hf_dataset), or a glob of jsonl / jsonl.gz / parquet files in sorted order, read
    by datasets' own json or parquet builder with streaming=True."""
    import datasets

    inputs = resolve_inputs(spec, setting)
    if len(inputs) == 1 and not os.path.isfile(inputs[0]):
        dataset = open_hf_dataset(inputs[0])
        return dataset.to_iterable_dataset() if isinstance(dataset, datasets.Dataset) else dataset
    builder = "parquet" if inputs[0].endswith(".parquet") else "json"
    if any(path.endswith(".parquet") != (builder == "parquet") for path in inputs):
        raise ConfigError(f"{setting}={spec!r} mixes parquet with other files; give one kind")
    if builder == "json" and not all(path.endswith((".jsonl", ".jsonl.gz")) for path in inputs):
        raise ConfigError(f"{setting}={spec!r}: streaming reads jsonl or parquet files only")
    return datasets.load_dataset(builder, data_files=inputs, split="train", streaming=True)
