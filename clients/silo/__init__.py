"""Organization data ("silos"): loading, validation, splitting, simulated orgs.

Import from here; the submodules are one responsibility each:
errors (exception types), records (Example/Silo), readers (file formats),
build (rows -> Silo), files (load_silo), split (train/test),
corpora (public corpora), virtual (simulated organizations).
"""

from .build import classification_silo, instruction_silo, render_classification_prompt
from .corpora import load_bbc_news, load_construction_faq
from .errors import (
    SiloEncodingError,
    SiloError,
    SiloFileEmpty,
    SiloFileNotFound,
    SiloFormatError,
    SiloMissingColumn,
    SiloNoRows,
)
from .files import SUPPORTED_EXTENSIONS, load_silo
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
    "SiloMissingColumn",
    "SiloNoRows",
    "classification_silo",
    "instruction_silo",
    "load_bbc_news",
    "load_construction_faq",
    "load_silo",
    "render_classification_prompt",
    "split_silo",
    "virtual_silo",
]
