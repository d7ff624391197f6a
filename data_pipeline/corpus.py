"""Find the files of a corpus (a text file is one document; a JSONL or parquet file holds one
per record, read by sources.read_documents).

`data.corpus` is either "stdlib" (the running Python's standard library `.py` files, a demo
corpus that needs no download) or a glob of local text files (`**` recurses).
"""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

from scaleforge.errors import ConfigError

STDLIB_CORPUS = "stdlib"
# Third-party packages installed into the interpreter are not part of the standard library.
_NOT_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def find_documents(corpus: str, max_bytes: int) -> list[Path]:
    """The files of `corpus` in sorted order, skipping empty ones, up to about `max_bytes`.

    Files are added until their total size reaches `max_bytes` (bytes on disk), so the last
    file may carry the total past it. Raises ConfigError naming `data.corpus` when nothing
    matches, every match is empty, or a matched file cannot be read.
    """
    if max_bytes <= 0:
        raise ConfigError(
            f"data.max_corpus_bytes={max_bytes} must be positive; set it to the number of corpus "
            "bytes to use, e.g. 8000000"
        )
    candidates = _stdlib_files() if corpus == STDLIB_CORPUS else _glob_files(corpus)
    documents: list[Path] = []
    total_bytes = 0
    for path in candidates:
        if total_bytes >= max_bytes:
            break
        size = _file_size(corpus, path)
        if size > 0:
            documents.append(path)
            total_bytes += size
    if not documents:
        raise ConfigError(
            f"data.corpus={corpus!r}: empty corpus, all {len(candidates)} matched files are empty; "
            "point data.corpus at non-empty text files"
        )
    return documents


def read_document(path: Path) -> str:
    """The text of one document. Bytes that are not UTF-8 become U+FFFD rather than failing,
    so a stray Latin-1 file does not stop a long preprocessing run."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as error:
        raise ConfigError(
            f"data.corpus: cannot read {path} ({error.strerror}); fix the file or narrow "
            "data.corpus so it no longer matches it"
        ) from error


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in _NOT_STDLIB_DIRS]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return sorted(files)


def _glob_files(corpus: str) -> list[Path]:
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(corpus), recursive=True))
    # A dangling link is kept so that reading it reports the file instead of skipping it.
    files = [path for path in matches if not path.is_dir()]
    if not files:
        raise ConfigError(
            f"data.corpus={corpus!r} matches no files; give an existing file or a glob such as "
            f"'texts/**/*.txt', or '{STDLIB_CORPUS}' for the built-in demo corpus"
        )
    return files


def _file_size(corpus: str, path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as error:
        raise ConfigError(
            f"data.corpus={corpus!r}: cannot read {path} ({error.strerror}); fix the file or "
            "narrow data.corpus so it no longer matches it"
        ) from error
