"""Instruction data made from the Python standard library, for the fine-tuning demo: each
documented function's signature is the prompt and the first paragraph of its docstring the
response (`sf-preprocess docstrings out=FILE.jsonl`). No download, no code is imported: the
source files are parsed with `ast`.

    {"prompt": "def quote(string, safe='/', encoding=None, errors=None):",
     "response": "quote('abc def') -> 'abc%20def'"}
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

from scaleforge.data_pipeline.corpus import STDLIB_CORPUS, find_documents, read_document
from scaleforge.errors import ConfigError


def docstring_pairs(max_bytes: int, max_response_chars: int) -> Iterator[dict[str, str]]:
    """{"prompt": signature, "response": docstring summary} of the functions and methods of
    the standard library's first `max_bytes` of source files, in file order; a docstring's
    first paragraph, whitespace collapsed, cut to `max_response_chars`."""
    for path in find_documents(STDLIB_CORPUS, max_bytes):
        try:
            tree = ast.parse(read_document(path))
        except (SyntaxError, ValueError):  # test files of deliberately broken syntax
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            docstring = ast.get_docstring(node)
            if not docstring or node.name.startswith("_"):
                continue
            summary = " ".join(docstring.split("\n\n")[0].split())[:max_response_chars]
            keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            yield {"prompt": f"{keyword} {node.name}({ast.unparse(node.args)}):",
                   "response": summary}


def write_docstring_pairs(out: Path, max_bytes: int, max_response_chars: int) -> int:
    """Write `docstring_pairs` to the JSONL file `out`, one record a line; returns how many."""
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(out, "w", encoding="utf-8") as stream:
        for pair in docstring_pairs(max_bytes, max_response_chars):
            stream.write(json.dumps(pair, ensure_ascii=False) + "\n")
            count += 1
    if count == 0:
        raise ConfigError(
            f"max_bytes={max_bytes}: the standard library's first files hold no documented "
            "function; raise max_bytes"
        )
    return count
