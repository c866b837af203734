"""Load an organization's silo file: path checks, layout detection, then build.

This is the entry point deployment agents use with their node's
``silo-path``. Everything that can be wrong with the file becomes a specific
SiloError whose message tells the operator what to fix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .build import classification_silo, instruction_silo, render_classification_prompt
from .errors import SiloFileNotFound, SiloMissingColumn
from .layouts import LAYOUTS, Layout, known_layouts, matching_layouts
from .readers import RawTable, read_table
from .records import TASKS, Silo

logger = logging.getLogger("silotune.silo")

#: The plain columns of each task's first layout, in (prompt-side, answer-side) order
#: (kept for callers; every layout is in ``layouts.LAYOUTS``).
REQUIRED_COLUMNS: dict[str, tuple[str, str]] = {
    "instruction": ("instruction", "response"),
    "classification": ("text", "label"),
}

__all__ = [
    "REQUIRED_COLUMNS",
    "load_silo",
    "render_classification_prompt",
    "classification_silo",
    "instruction_silo",
]


def load_silo(path: str | os.PathLike[str], *, task: str = "auto", max_chars: int = 2000) -> Silo:
    """Read, validate and convert a silo in any registered format (``formats/``).

    Built in: ``.jsonl``, ``.csv``, ``.parquet``, ``.json`` (an array of
    objects), ``.arrow`` and a Hugging Face ``datasets`` folder
    (``Dataset.save_to_disk``); ``supported_extensions()`` lists what is
    registered now.

    The column layout (``layouts.py``) is detected: ``instruction`` +
    ``response``, ``text`` + ``label`` (classification), chat ``messages``,
    ``prompt`` + ``completion``, alpaca ``instruction``/``input``/``output``.
    Forcing a task makes one of that task's layouts mandatory. Fields longer
    than ``max_chars`` are truncated (with a warning) so one huge document
    cannot blow up a training step.
    """
    valid = ("auto", *TASKS)
    if task not in valid:
        raise ValueError(f"task must be one of {', '.join(map(repr, valid))}; got {task!r}")
    source = os.fspath(path)
    file = Path(source)
    if not file.exists():
        raise SiloFileNotFound(f"{source}: silo file not found")
    if not file.is_file() and not file.is_dir():
        raise SiloFileNotFound(f"{source}: not a regular file")

    table = read_table(file)  # a folder no format reads: SiloFileNotFound ("not a regular file")
    layout = _resolve_layout(table, task, source)
    build = instruction_silo if layout.task == "instruction" else classification_silo
    silo = build(layout.pairs(table, source), source, max_chars)
    logger.info("%s: loaded %d %s examples (%s layout)", source, len(silo), layout.task, layout.name)
    return silo


def _resolve_layout(table: RawTable, task: str, source: str) -> Layout:
    """Pick the layout from the columns (auto: the first that matches) or among the forced task's."""
    found_text = ", ".join(repr(c) for c in table.columns) or "none"
    if task == "auto":
        candidates = matching_layouts(table.columns)
        if not candidates:
            raise SiloMissingColumn(
                f"{source}: cannot tell the task from the columns; known column layouts: "
                f"{known_layouts()}; found: {found_text}{_case_hint(table.columns)}"
            )
        if len({c.task for c in candidates}) > 1:
            logger.warning(
                "%s: has both instruction and text/label columns; using the %r layout "
                "(pass task= to choose)", source, candidates[0].name,
            )
        return candidates[0]
    candidates = matching_layouts(table.columns, task)
    if candidates:
        return candidates[0]
    layouts = [layout for layout in LAYOUTS if layout.task == task]
    if len(layouts) == 1:
        needed = layouts[0].columns
        missing = [c for c in needed if c not in table.columns]
        raise SiloMissingColumn(
            f"{source}: task {task!r} needs columns {', '.join(map(repr, needed))}; "
            f"missing {', '.join(map(repr, missing))}; found: {found_text}{_case_hint(table.columns)}"
        )
    raise SiloMissingColumn(
        f"{source}: task {task!r} needs the columns of one of its layouts: {known_layouts(task)}; "
        f"found: {found_text}{_case_hint(table.columns)}"
    )


def _case_hint(columns: tuple[str, ...]) -> str:
    """Point out near misses like 'Text' for 'text' (names are case-sensitive)."""
    wanted = {c for layout in LAYOUTS for c in layout.columns}
    near = [c.strip().lower() for c in columns if c not in wanted and c.strip().lower() in wanted]
    if not near:
        return ""
    return f" (column names are case-sensitive: did you mean {', '.join(map(repr, near))}?)"
