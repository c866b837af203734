"""Load an organization's silo file: path checks, layout detection, then build.

This is the entry point deployment agents use with their node's
``silo-path``. Everything that can be wrong with the file becomes a specific
SiloError whose message tells the operator what to fix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from protos.task_spec import CLASSIFICATION_TEMPLATE, INSTRUCTION_TEMPLATE, TaskSpec

from .build import classification_silo, instruction_silo, render_classification_prompt
from .errors import SiloFileNotFound, SiloMissingColumn
from .layouts import CHAT_LAYOUTS, LAYOUTS, Layout, known_layouts, matching_layouts
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
    "read_silo_table",
    "silo_from_table",
    "render_classification_prompt",
    "classification_silo",
    "instruction_silo",
]


def load_silo(path: str | os.PathLike[str], *, task: str = "auto", max_chars: int = 2000,
              spec: TaskSpec | None = None) -> Silo:
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

    ``spec``, the job's task (protos/task_spec.py), decides the task, the
    label set and the prompt template instead of the file: a round loads its
    silo with the spec of the job, so every organization renders the same
    prompts.
    """
    return silo_from_table(read_silo_table(path), os.fspath(path), task=task, max_chars=max_chars, spec=spec)


def read_silo_table(path: str | os.PathLike[str]) -> RawTable:
    """The silo's raw columns (path checks, then the format chosen by extension or folder)."""
    source = os.fspath(path)
    file = Path(source)
    if not file.exists():
        raise SiloFileNotFound(f"{source}: silo file not found")
    if not file.is_file() and not file.is_dir():
        raise SiloFileNotFound(f"{source}: not a regular file")
    return read_table(file)  # a folder no format reads: SiloFileNotFound ("not a regular file")


def silo_from_table(table: RawTable, source: str, *, task: str = "auto", max_chars: int = 2000,
                    spec: TaskSpec | None = None) -> Silo:
    """Raw columns -> Silo, under the job's ``spec`` when there is one (see ``load_silo``)."""
    if spec is not None:
        task = spec.kind
    valid = ("auto", *TASKS)
    if task not in valid:
        raise ValueError(f"task must be one of {', '.join(map(repr, valid))}; got {task!r}")
    layout = _resolve_layout(table, task, source)
    pairs = layout.pairs(table, source)
    if layout.task == "classification":
        silo = classification_silo(
            pairs, source, max_chars,
            labels=(spec.labels or None) if spec is not None else None,
            unknown_labels=spec.unknown_labels if spec is not None else "error",
            template=spec.template_for("classification") if spec is not None else CLASSIFICATION_TEMPLATE)
    else:
        silo = instruction_silo(
            pairs, source, max_chars, task="chat" if task == "chat" else "instruction",
            template=spec.template_for("instruction") if spec is not None else INSTRUCTION_TEMPLATE)
    logger.info("%s: loaded %d %s examples (%s layout)", source, len(silo), silo.task, layout.name)
    return silo


def _layouts_of(task: str) -> list[Layout]:
    if task == "chat":
        return [layout for layout in LAYOUTS if layout.name in CHAT_LAYOUTS]
    return [layout for layout in LAYOUTS if layout.task == task]


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
    layouts = _layouts_of(task)
    candidates = [layout for layout in layouts if set(table.columns).issuperset(layout.columns)]
    if candidates:
        return candidates[0]
    if len(layouts) == 1:
        needed = layouts[0].columns
        missing = [c for c in needed if c not in table.columns]
        raise SiloMissingColumn(
            f"{source}: task {task!r} needs columns {', '.join(map(repr, needed))}; "
            f"missing {', '.join(map(repr, missing))}; found: {found_text}{_case_hint(table.columns)}"
        )
    raise SiloMissingColumn(
        f"{source}: task {task!r} needs the columns of one of its layouts: "
        f"{', '.join(layout.describe() for layout in layouts)}; "
        f"found: {found_text}{_case_hint(table.columns)}"
    )


def _case_hint(columns: tuple[str, ...]) -> str:
    """Point out near misses like 'Text' for 'text' (names are case-sensitive)."""
    wanted = {c for layout in LAYOUTS for c in layout.columns}
    near = [c.strip().lower() for c in columns if c not in wanted and c.strip().lower() in wanted]
    if not near:
        return ""
    return f" (column names are case-sensitive: did you mean {', '.join(map(repr, near))}?)"
