"""arrow: Arrow IPC files, and Hugging Face ``datasets`` folders (``Dataset.save_to_disk``).

A ``save_to_disk`` folder holds ``dataset_info.json`` and ``state.json`` next
to ``data-00000-of-0000N.arrow`` shards, each an Arrow IPC *stream*. The
``datasets`` package is not needed (nor a dependency): the shards are read
with pyarrow, in the order ``state.json``'s ``_data_files`` lists them (else
sorted by name). A single ``.arrow`` file (IPC stream or IPC file format) is
read the same way. A ``DatasetDict`` folder (``dataset_dict.json`` and one
sub-folder per split) is refused, naming its splits: point the silo at one
split's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from clients.silo.errors import SiloFileEmpty, SiloFormatError
from clients.silo.formats import RawTable, SiloFormat, register_format, table_from_arrow

#: files of which one marks a folder as a ``datasets`` folder
_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@register_format("arrow")
class Arrow(SiloFormat):
    extensions = (".arrow",)
    list_order = 40

    @classmethod
    def reads_directory(cls, path: Path) -> bool:
        """a Hugging Face datasets folder (Dataset.save_to_disk: dataset_info.json or state.json + *.arrow)"""
        return any((path / marker).is_file() for marker in _MARKERS)

    @classmethod
    def read(cls, path: Path) -> RawTable:
        """The rows of one ``.arrow`` file or of a ``datasets`` folder's shards, concatenated."""
        import pyarrow as pa  # imported lazily, as for Parquet

        shards = _shards(path) if path.is_dir() else [path]
        tables = [_read_shard(shard) for shard in shards]
        try:
            table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        except pa.ArrowInvalid as exc:
            raise SiloFormatError(f"{path}: its .arrow shards do not share one schema ({exc})") from None
        if table.num_rows == 0:
            raise SiloFileEmpty(f"{path}: no data rows")
        return table_from_arrow(table, path)


def _shards(folder: Path) -> list[Path]:
    """The ``.arrow`` shards of a ``save_to_disk`` folder, in the dataset's row order."""
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise SiloFormatError(
            f"{folder}: a DatasetDict folder (several splits); point the silo at one split's folder: "
            + (", ".join(str(folder / s) for s in splits) or "(no split folders found)")
        )
    listed: list[str] = []
    state = folder / "state.json"
    if state.is_file():
        try:
            listed = [entry["filename"] for entry in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise SiloFormatError(f"{folder}: unreadable state.json ({type(exc).__name__}: {exc})") from None
    if listed:
        shards = [folder / name for name in listed]
        missing = [name for name, shard in zip(listed, shards) if not shard.is_file()]
        if missing:
            raise SiloFormatError(f"{folder}: state.json lists shards that are missing: {', '.join(missing)}")
        return shards
    shards = sorted(p for p in folder.glob("*.arrow") if p.is_file())
    if not shards:
        raise SiloFormatError(f"{folder}: a datasets folder without any .arrow data file "
                              "(expected data-00000-of-00001.arrow, as Dataset.save_to_disk writes)")
    return shards


def _read_shard(shard: Path):
    """One Arrow IPC stream (what ``datasets`` writes) or IPC file."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    if shard.stat().st_size == 0:
        raise SiloFileEmpty(f"{shard}: file is empty (0 bytes)")
    data = pa.py_buffer(shard.read_bytes())  # in memory: the table must outlive any open file
    errors = []
    for opener in (ipc.open_stream, ipc.open_file):
        try:
            return opener(data).read_all()
        except (pa.ArrowException, OSError, ValueError) as exc:
            errors.append(str(exc))
    raise SiloFormatError(f"{shard}: not an Arrow IPC stream or file ({errors[0]})")
