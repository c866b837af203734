"""Load an organization's silo file: path checks, task detection, then build.

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
from .readers import RawTable, read_table
from .records import TASKS, Silo

logger = logging.getLogger("silotune.silo")

#: Columns each task reads, in (prompt-side, answer-side) order.
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
    """Read, validate and convert a silo file in any registered format (``formats/``).

    Built in: ``.jsonl``, ``.csv``, ``.parquet``; ``supported_extensions()``
    lists what is registered now.

    ``task="auto"`` picks "instruction" for ``instruction``+``response``
    columns and "classification" for ``text``+``label``; forcing a task makes
    those columns mandatory. Fields longer than ``max_chars`` are truncated
    (with a warning) so one huge document cannot blow up a training step.
    """
    valid = ("auto", *TASKS)
    if task not in valid:
        raise ValueError(f"task must be one of {', '.join(map(repr, valid))}; got {task!r}")
    source = os.fspath(path)
    file = Path(source)
    if not file.exists():
        raise SiloFileNotFound(f"{source}: silo file not found")
    if not file.is_file():
        raise SiloFileNotFound(f"{source}: not a regular file")

    table = read_table(file)
    resolved = _resolve_task(table, task, source)
    first, second = REQUIRED_COLUMNS[resolved]
    rows = zip(table.column(first), table.column(second))
    build = instruction_silo if resolved == "instruction" else classification_silo
    silo = build(rows, source, max_chars)
    logger.info("%s: loaded %d %s examples", source, len(silo), resolved)
    return silo


def _resolve_task(table: RawTable, task: str, source: str) -> str:
    """Pick the task from the columns (auto) or check the forced task's columns."""
    found = set(table.columns)
    found_text = ", ".join(repr(c) for c in table.columns) or "none"
    if task == "auto":
        candidates = [t for t, cols in REQUIRED_COLUMNS.items() if found.issuperset(cols)]
        if not candidates:
            raise SiloMissingColumn(
                f"{source}: cannot tell the task from the columns; need 'instruction' + 'response' "
                f"(instruction tuning) or 'text' + 'label' (classification); found: {found_text}"
                f"{_case_hint(table.columns)}"
            )
        if len(candidates) > 1:
            logger.warning(
                "%s: has both instruction/response and text/label columns; using %r "
                "(pass task= to choose)", source, candidates[0],
            )
        return candidates[0]
    needed = REQUIRED_COLUMNS[task]
    missing = [c for c in needed if c not in found]
    if missing:
        raise SiloMissingColumn(
            f"{source}: task {task!r} needs columns {', '.join(map(repr, needed))}; "
            f"missing {', '.join(map(repr, missing))}; found: {found_text}{_case_hint(table.columns)}"
        )
    return task


def _case_hint(columns: tuple[str, ...]) -> str:
    """Point out near misses like 'Text' for 'text' (names are case-sensitive)."""
    wanted = {c for cols in REQUIRED_COLUMNS.values() for c in cols}
    near = [c.strip().lower() for c in columns if c not in wanted and c.strip().lower() in wanted]
    if not near:
        return ""
    return f" (column names are case-sensitive: did you mean {', '.join(map(repr, near))}?)"
