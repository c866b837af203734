"""csv: a header row, then data rows (RFC 4180 quoting, as Excel and pandas write it).

This module is ``clients.silo.formats.csv``; ``import csv`` below is still the
standard library's (imports are absolute), and nothing else can reach this
module under the bare name ``csv``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from clients.silo.errors import SiloFileEmpty, SiloFormatError
from clients.silo.formats import RawTable, SiloFormat, decode_utf8, register_format, table_from_columns


@register_format("csv")
class Csv(SiloFormat):
    extensions = (".csv",)
    list_order = 20

    @classmethod
    def read(cls, path: Path) -> RawTable:
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
        return table_from_columns(columns, num_rows)
