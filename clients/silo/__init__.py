"""Organization data ("silos"): loading, validation, splitting, simulated orgs.

Import from here; the submodules are one responsibility each:
errors (exception types), records (Example/Silo), formats/ (one module per
file format, registering itself: jsonl, json, csv, parquet, arrow (also
Hugging Face datasets folders); shared helpers in formats/_common), readers
(picks the format by extension or folder -> raw columns), layouts (which
columns hold prompt and answer: instruction/response, text/label, messages,
prompt/completion, alpaca), build (rows -> Silo), files (load_silo), split (train/test),
corpora (public corpora), virtual (simulated organizations).

``SUPPORTED_EXTENSIONS`` is computed from the format registry each time it is
read (a module ``__getattr__``), so a format added after import is listed too
and importing this package imports no format module.
"""

from .build import classification_silo, instruction_silo, render_classification_prompt
from .corpora import load_bbc_news, load_construction_faq
from .errors import (
    SiloEncodingError,
    SiloError,
    SiloFileEmpty,
    SiloFileNotFound,
    SiloFormatError,
    SiloMalformedRow,
    SiloMissingColumn,
    SiloNoRows,
    SiloUnknownLabel,
)
from .files import load_silo
from .formats import supported_extensions
from .records import Example, Silo
from .split import split_silo
from .virtual import DATASETS, virtual_silo

__all__ = [
    "DATASETS",
    "SUPPORTED_EXTENSIONS",
    "Example",
    "Silo",
    "SiloEncodingError",
    "SiloError",
    "SiloFileEmpty",
    "SiloFileNotFound",
    "SiloFormatError",
    "SiloMalformedRow",
    "SiloMissingColumn",
    "SiloNoRows",
    "SiloUnknownLabel",
    "classification_silo",
    "instruction_silo",
    "load_bbc_news",
    "load_construction_faq",
    "load_silo",
    "render_classification_prompt",
    "split_silo",
    "supported_extensions",
    "virtual_silo",
]


def __getattr__(name: str) -> object:
    """``SUPPORTED_EXTENSIONS``: the registered formats' extensions, read when asked for."""
    if name == "SUPPORTED_EXTENSIONS":
        return supported_extensions()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
