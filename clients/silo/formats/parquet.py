"""parquet: columnar binary files, read with pyarrow; only the needed columns are converted.

pyarrow is imported inside ``read`` so that scanning the formats (and loading
a JSONL or CSV silo) does not pay for it.
"""

from __future__ import annotations

from pathlib import Path

from clients.silo.errors import SiloFileEmpty, SiloFormatError
from clients.silo.formats import RawTable, SiloFormat, register_format, table_from_arrow


@register_format("parquet")
class Parquet(SiloFormat):
    extensions = (".parquet",)
    list_order = 30

    @classmethod
    def read(cls, path: Path) -> RawTable:
        """Parquet via pyarrow; a column is converted to Python values only when asked for."""
        import pyarrow as pa  # imported lazily: only Parquet silos pay for it
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise SiloFormatError(f"{path}: unreadable Parquet file ({exc})") from None
        if table.num_rows == 0:
            raise SiloFileEmpty(f"{path}: Parquet file has no rows")
        return table_from_arrow(table, path)
