"""Errors raised while loading an organization's private data ("silo").

Every error subclasses :class:`SiloError`, itself a ``ValueError``, so callers
can catch "the data is bad" in one place while the CLI can still show a
specific, actionable message. Messages always name the file, and the line or
byte position when there is one, because the person reading them is an
operator at the organization who has to go and fix that file.
"""

from __future__ import annotations


class SiloError(ValueError):
    """Base class: the silo file cannot be turned into training examples."""


class SiloFileNotFound(SiloError):
    """The path does not exist or is not a regular file."""


class SiloFileEmpty(SiloError):
    """The file has zero bytes, or a header/structure but no data rows."""


class SiloFormatError(SiloError):
    """Unknown extension, malformed JSON line, or unreadable CSV/Parquet."""


class SiloMalformedRow(SiloFormatError):
    """A row whose structure is wrong for its column layout (the message names the row).

    For example a ``messages`` list without an assistant turn, a message whose
    ``content`` is not a string, or an unknown role. A SiloFormatError, so code
    catching that still catches it.
    """


class SiloMissingColumn(SiloError):
    """The columns needed for the task are absent."""


class SiloEncodingError(SiloError):
    """The file is not valid UTF-8."""


class SiloUnknownLabel(SiloError):
    """Rows whose label is outside the job's label set (the message names them)."""


class SiloNoRows(SiloError):
    """Rows existed but none survived filtering (blank/missing/non-string fields)."""


__all__ = [
    "SiloError",
    "SiloFileNotFound",
    "SiloFileEmpty",
    "SiloFormatError",
    "SiloMalformedRow",
    "SiloMissingColumn",
    "SiloEncodingError",
    "SiloNoRows",
    "SiloUnknownLabel",
]
