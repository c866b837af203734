"""Format readers: turn a silo file into named columns of raw Python values.

This layer only knows about bytes, encodings and file formats. It does not
know which columns a task needs or what a valid value is (``build.py`` does),
so that JSONL, CSV and Parquet files holding the same data yield the same
raw columns and therefore identical silos.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import SiloEncodingError, SiloFileEmpty, SiloFormatError

#: Extensions we can read, matched case-insensitively.
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class RawTable:
    """Column names plus a getter that materialises one column on demand.

    Columns are fetched lazily so a Parquet file with big unrelated columns
    (embeddings, metadata) only pays for the two columns the task needs.
    Missing cells (a JSON object without that key, a short CSV row) are None.
    """

    columns: tuple[str, ...]
    num_rows: int
    _column: Callable[[str], list[object]]

    def column(self, name: str) -> list[object]:
        """All values of column ``name`` in row order (None where absent)."""
        return self._column(name)


def read_table(path: Path) -> RawTable:
    """Read ``path`` according to its extension.

    Raises SiloFormatError for an unsupported extension or unreadable content,
    SiloFileEmpty when there are no data rows, SiloEncodingError for non-UTF-8
    text files.
    """
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise SiloFormatError(
            f"{path}: unsupported file extension {path.suffix or '(none)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if path.stat().st_size == 0:
        raise SiloFileEmpty(f"{path}: file is empty (0 bytes)")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    return _read_parquet(path)


def decode_utf8(data: bytes, path: Path) -> str:
    """Decode strictly as UTF-8 (a leading BOM is allowed and removed).

    Strict because silently replacing bad bytes would train the model on
    mojibake; the error says where the first bad byte is so it can be fixed.
    """
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + bom  # offset in the file, BOM included
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise SiloEncodingError(
            f"{path}: not valid UTF-8 at byte offset {offset} (line {line}, byte column "
            f"{column}, byte 0x{data[offset]:02x}: {exc.reason}); re-save the file as UTF-8"
        ) from None


def _columnar(columns: dict[str, list[object]], num_rows: int) -> RawTable:
    """Wrap already-materialised columns (JSONL/CSV) in a RawTable."""

    def get(name: str) -> list[object]:
        return columns.get(name, [None] * num_rows)

    return RawTable(tuple(columns), num_rows, get)


def _read_jsonl(path: Path) -> RawTable:
    """One JSON object per line; blank lines are skipped.

    Lines are split on "\\n" only (not str.splitlines), because a JSON string
    may legally contain raw U+2028 or other characters splitlines breaks on.
    """
    text = decode_utf8(path.read_bytes(), path)
    columns: dict[str, list[object]] = {}
    num_rows = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SiloFormatError(
                f"{path}: line {lineno}, column {exc.colno}: malformed JSON ({exc.msg})"
            ) from None
        if not isinstance(obj, dict):
            raise SiloFormatError(
                f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}"
            )
        for key in obj:
            if key not in columns:  # a key first seen now: earlier rows lack it
                columns[key] = [None] * num_rows
        for key, values in columns.items():
            values.append(obj.get(key))
        num_rows += 1
    if num_rows == 0:
        raise SiloFileEmpty(f"{path}: no data rows (only blank lines)")
    return _columnar(columns, num_rows)


def _read_csv(path: Path) -> RawTable:
    """Header row, then data rows; parsed with the csv module in strict mode.

    Strict mode turns an unterminated quote into an error instead of letting it
    silently swallow every following row into one field.
    """
    text = decode_utf8(path.read_bytes(), path)
    if not text.strip():
        raise SiloFileEmpty(f"{path}: file has no content")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [name.strip() for name in next(reader)]
        duplicates = sorted({n for n in header if header.count(n) > 1})
        if duplicates:
            raise SiloFormatError(f"{path}: line 1: duplicate column names {duplicates}")
        columns: dict[str, list[object]] = {name: [] for name in header}
        num_rows = 0
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            for i, name in enumerate(header):
                columns[name].append(row[i] if i < len(row) else None)
            num_rows += 1
    except csv.Error as exc:
        raise SiloFormatError(f"{path}: line {reader.line_num}: unreadable CSV ({exc})") from None
    if num_rows == 0:
        raise SiloFileEmpty(f"{path}: header only, no data rows")
    return _columnar(columns, num_rows)


def _read_parquet(path: Path) -> RawTable:
    """Parquet via pyarrow; only the columns the task needs are converted."""
    import pyarrow as pa  # imported lazily: only Parquet silos pay for it
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise SiloFormatError(f"{path}: unreadable Parquet file ({exc})") from None
    if table.num_rows == 0:
        raise SiloFileEmpty(f"{path}: Parquet file has no rows")

    def get(name: str) -> list[object]:
        if name not in table.column_names:
            return [None] * table.num_rows
        try:
            return table.column(name).to_pylist()
        except UnicodeDecodeError as exc:
            raise SiloEncodingError(
                f"{path}: column {name!r} holds text that is not valid UTF-8 ({exc.reason})"
            ) from None

    return RawTable(tuple(table.column_names), table.num_rows, get)
