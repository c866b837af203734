"""Format readers: turn a silo file into named columns of raw Python values.

This layer only knows about bytes, encodings and file formats. It does not
know which columns a task needs or what a valid value is (``build.py`` does),
so that JSONL, CSV and Parquet files holding the same data yield the same
raw columns and therefore identical silos.

The formats themselves are modules of ``formats/`` that register themselves;
``read_table`` only picks one by the file's extension, so adding a format
does not touch this file.
"""

from __future__ import annotations

from pathlib import Path

from .errors import SiloFileEmpty, SiloFileNotFound, SiloFormatError
from .formats import RawTable, by_extension, decode_utf8, directory_formats, supported_extensions

__all__ = ["RawTable", "decode_utf8", "read_table", "supported_extensions"]


def read_table(path: Path) -> RawTable:
    """Read ``path`` with the registered format for its extension (case-insensitive).

    Raises SiloFormatError for an unsupported extension or unreadable content,
    SiloFileEmpty for a 0-byte file or one without data rows, SiloEncodingError
    for non-UTF-8 text; ValueError when two formats claim one extension. A folder
    is read by the format whose ``reads_directory`` claims it (a Hugging Face
    ``datasets`` folder); any other folder is SiloFileNotFound.
    """
    formats = by_extension()
    if path.is_dir():
        return _checked(_directory_format(path), path)
    fmt = formats.get(path.suffix.lower())
    if fmt is None:
        raise SiloFormatError(
            f"{path}: unsupported file extension {path.suffix or '(none)'!r}; "
            f"supported: {', '.join(formats)}"
        )
    if path.stat().st_size == 0:
        raise SiloFileEmpty(f"{path}: file is empty (0 bytes)")
    return _checked(fmt, path)


def _directory_format(path: Path) -> type:
    """The format that reads the folder ``path``; SiloFileNotFound when none does."""
    for fmt in directory_formats():
        if fmt.reads_directory(path):
            return fmt
    readable = "; ".join(f"{fmt.name}: {(fmt.reads_directory.__doc__ or '').strip().splitlines()[0]}"
                         for fmt in directory_formats() if fmt.reads_directory.__doc__)
    raise SiloFileNotFound(f"{path}: not a regular file but a folder that no silo format reads"
                           + (f" (folders read: {readable})" if readable else ""))


def _checked(fmt: type, path: Path) -> RawTable:
    table = fmt.read(path)
    if not isinstance(table, RawTable):  # a format module's bug, not the operator's file
        raise TypeError(f"silo format {fmt.name!r} ({fmt.__module__}) returned {type(table).__name__}, "
                        "not a RawTable")
    return table
