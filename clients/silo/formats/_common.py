"""What every silo format shares: the RawTable it returns and strict UTF-8 decoding.

Underscore-named so the format registry does not take it for a format. Format
modules import these names from ``clients.silo.formats``, which re-exports them.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from clients.silo.errors import SiloEncodingError


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


def table_from_columns(columns: dict[str, list[object]], num_rows: int) -> RawTable:
    """Wrap already-materialised columns (JSONL/CSV) in a RawTable; an absent column is all None."""

    def get(name: str) -> list[object]:
        return columns.get(name, [None] * num_rows)

    return RawTable(tuple(columns), num_rows, get)


def add_record(columns: dict[str, list[object]], record: dict, num_rows: int) -> None:
    """Append one JSON object as a row; ``num_rows`` rows came before it. A key first
    seen now gets None for the earlier rows, a key it lacks gets None for this one."""
    for key in record:
        if key not in columns:
            columns[key] = [None] * num_rows
    for key, values in columns.items():
        values.append(record.get(key))


def table_from_arrow(table: Any, path: Path) -> RawTable:
    """A pyarrow Table (Parquet, Arrow) as a RawTable; columns are converted when asked for."""

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
