"""Sweep tables on disk: CSV always, parquet too when pyarrow is installed.

A table is a list of row dicts. Reading converts numeric strings to floats (and "nan" to
NaN) and leaves the rest as text.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from scaleforge.errors import ConfigError


def write_table(rows: list[dict], path: Path) -> list[Path]:
    """Write `rows` to `path` (.csv) and, when pyarrow is importable, beside it as .parquet.
    Returns the paths written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    written = [path]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    parquet = path.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    return written + [parquet]


def _value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def read_table(path: Path, required: tuple[str, ...] = ("N", "D", "loss")) -> list[dict]:
    """Rows of the CSV at `path`; raises ConfigError naming a missing file or column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"table={path} does not exist; give the CSV `sf-sweep collect` wrote")
    with open(path, newline="") as handle:
        rows = [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    if not rows:
        raise ConfigError(f"table={path} has no rows")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise ConfigError(
            f"table={path} lacks the column(s) {', '.join(missing)}; it has "
            f"{', '.join(rows[0])}. A fit needs N (parameters), D (tokens) and loss"
        )
    for i, row in enumerate(rows):
        for column in required:
            if not isinstance(row[column], float):
                raise ConfigError(
                    f"table={path} line {i + 2}: {column}={row[column]!r} is not a number"
                )
    return rows


def is_finite_row(row: dict, columns: tuple[str, ...]) -> bool:
    """True when every column of `row` in `columns` is a finite number."""
    return all(isinstance(row[c], float) and math.isfinite(row[c]) for c in columns)
