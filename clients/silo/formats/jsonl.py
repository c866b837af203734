"""jsonl: one JSON object per line; each key is a column."""

from __future__ import annotations

import json
from pathlib import Path

from clients.silo.errors import SiloFileEmpty, SiloFormatError
from clients.silo.formats import RawTable, SiloFormat, add_record, decode_utf8, register_format, table_from_columns


@register_format("jsonl")
class Jsonl(SiloFormat):
    extensions = (".jsonl",)
    list_order = 10

    @classmethod
    def read(cls, path: Path) -> RawTable:
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
            add_record(columns, obj, num_rows)
            num_rows += 1
        if num_rows == 0:
            raise SiloFileEmpty(f"{path}: no data rows (only blank lines)")
        return table_from_columns(columns, num_rows)
