"""Silo file formats: how the bytes of an organization's file become named columns.

One format is one module of this package. It subclasses ``SiloFormat`` and
decorates the class with ``@register_format(name)``; the registry finds the
module by itself (protos/registry.py), so ``load_silo``, its "unsupported file
extension" message and ``silotune agent check`` learn of it without being
edited. Modules starting with ``_`` (``_common.py``) are helpers, not formats.

The interface (class attributes and a classmethod; a format holds no state):

* ``name`` — the format's name; the decorator sets it to the registered name.
* ``extensions`` — the file extensions it reads: a tuple of lower-case strings
  with their dot (``(".jsonl",)``). A file's extension is matched
  case-insensitively; two formats may not claim the same one (``by_extension``
  refuses it, naming both).
* ``list_order`` — where the format's extensions come in listings such as the
  error message (lower first, then by name); the built-ins use 10, 20, 30.
* ``read(path)`` — the file's columns as a ``RawTable``. It is called only for
  an existing, non-empty regular file with one of ``extensions``. It raises
  ``SiloFormatError`` for content it cannot parse (naming the file, and the line
  when there is one), ``SiloFileEmpty`` when there are no data rows and
  ``SiloEncodingError`` for text that is not UTF-8 (``decode_utf8`` does that).
  Missing cells are None; values are raw (strings, numbers): which columns a
  task needs and what a valid value is is decided later (``build.py``), so every
  format holding the same data yields the same silo.

* ``reads_directory(path)`` (optional; False by default) — whether this format
  reads the folder ``path`` (a Hugging Face ``datasets`` folder, for the
  ``arrow`` format). ``read`` is then called with that folder; a folder no
  format claims is refused as "not a regular file".

``read`` is abstract: the registry refuses a class that lacks it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Mapping

from clients.silo.formats._common import RawTable, add_record, decode_utf8, table_from_arrow, table_from_columns
from protos.registry import Registry, where

__all__ = [
    "FORMATS",
    "RawTable",
    "SiloFormat",
    "by_extension",
    "directory_formats",
    "add_record",
    "decode_utf8",
    "register_format",
    "supported_extensions",
    "table_from_arrow",
    "table_from_columns",
]

#: list_order of a format that does not set one: after the built-ins
_DEFAULT_LIST_ORDER = 100


class SiloFormat(ABC):
    """Base of every silo format; see the package docstring for the contract."""

    name: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]
    list_order: ClassVar[int] = _DEFAULT_LIST_ORDER

    @classmethod
    @abstractmethod
    def read(cls, path: Path) -> RawTable:
        """The file's columns; SiloFormatError / SiloFileEmpty / SiloEncodingError otherwise."""

    @classmethod
    def reads_directory(cls, path: Path) -> bool:
        """Whether ``read`` takes the folder ``path`` (formats that read one folder override this)."""
        return False


def _listing_order(name: str, fmt: type[SiloFormat]) -> tuple[int, str]:
    return getattr(fmt, "list_order", _DEFAULT_LIST_ORDER), name


#: every silo format, by name; a format joins it in its own module with ``@register_format("name")``
FORMATS: Registry[type[SiloFormat]] = Registry("silo format", "clients.silo.formats", order=_listing_order,
                                                name_attr="name")

register_format = FORMATS.register



def by_extension() -> Mapping[str, type[SiloFormat]]:
    """Every registered format by each extension it reads, in listing order.

    ValueError, naming the formats, when two claim one extension or one
    declares a malformed extension: which format reads a file must never
    depend on import order. Rebuilt only when the registry's members change.
    """
    return FORMATS.derived(_by_extension_table)


def _by_extension_table(members: tuple) -> dict:
    table: dict = {}
    for name, fmt in members:
        extensions = getattr(fmt, "extensions", None)
        if isinstance(extensions, str) or not isinstance(extensions, (tuple, list)) or not extensions:
            raise ValueError(f"silo format {name!r} ({where(fmt)}): extensions must be a non-empty tuple "
                             f"such as ('.{name}',), got {extensions!r}")
        for extension in extensions:
            if not _valid_extension(extension):
                raise ValueError(f"silo format {name!r} ({where(fmt)}): extension {extension!r} must be "
                                 "lower case, start with '.' and contain no other '.', space or '/'")
            other = table.get(extension)
            if other is not None and other is not fmt:
                raise ValueError(f"silo formats {other.name!r} ({where(other)}) and {name!r} ({where(fmt)}) "
                                 f"both claim the extension {extension!r}; each extension must be read by "
                                 "one format (remove or rename one of them)")
            table[extension] = fmt
    return table


def directory_formats() -> tuple[type[SiloFormat], ...]:
    """The registered formats that read some folders (they override ``reads_directory``), in listing order."""
    return tuple(fmt for _, fmt in FORMATS.items()
                 if getattr(fmt, "reads_directory", SiloFormat.reads_directory).__func__
                 is not SiloFormat.reads_directory.__func__)


def supported_extensions() -> tuple[str, ...]:
    """The extensions ``load_silo`` reads, in listing order (".jsonl", ".csv", ".parquet", ...)."""
    return tuple(by_extension())


def _valid_extension(extension: object) -> bool:
    return (isinstance(extension, str) and len(extension) > 1 and extension.startswith(".")
            and extension == extension.lower() and "." not in extension[1:]
            and not any(c.isspace() or c in "/\\" for c in extension))


