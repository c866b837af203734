"""Rows -> validated Silo: filtering, truncation and prompt rendering.

Shared by file silos (``files.load_silo``) and simulated organizations
(``virtual.virtual_silo``) so both go through exactly the same rules and
produce prompts in exactly the same format.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

from protos.task_spec import CLASSIFICATION_TEMPLATE, INSTRUCTION_TEMPLATE

from .errors import SiloNoRows, SiloUnknownLabel
from .records import Example, Silo, Turn

logger = logging.getLogger("silotune.silo")


def render_classification_prompt(text: str, labels: Sequence[str],
                                 template: str = CLASSIFICATION_TEMPLATE) -> str:
    """The user message for classification: by default the category list, then the text.

    Listing the categories lets a generative model answer with one of them
    verbatim, so accuracy is an exact string match on the answer. A job's
    ``prompt-template`` (protos/task_spec.py) replaces the wording.
    """
    return template.format(labels=", ".join(labels), text=text)


def _as_text(value: object) -> str | None:
    """A stripped non-blank string, or None for anything we must not train on.

    Windows line endings inside a field (multi-line CSV cells from Excel) become
    "\n", so the same data gives the same prompt whatever tool exported it.
    """
    if isinstance(value, str):
        value = value.replace("\r\n", "\n").strip()
        return value or None
    return None


def _as_label(value: object) -> str | None:
    """Like _as_text, but integer labels (common in CSV/Parquet/JSON) become strings.

    Integral floats also count as ints: pandas turns an int column with a
    missing value into float64 (1 -> 1.0), and "1.0" must not become a
    separate class from "1". Booleans are rejected, not stringified.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return _as_text(value)


def _check_max_chars(max_chars: int) -> None:
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be a positive int, got {max_chars!r}")


def _report(source: str, total: int, dropped: int, truncated: int, max_chars: int, fields: str) -> None:
    """One warning per kind of problem (not one per row), then fail if nothing is left."""
    if dropped:
        logger.warning(
            "%s: dropped %d of %d rows with a missing, null, non-text or blank %s",
            source, dropped, total, fields,
        )
    if truncated:
        logger.warning(
            "%s: truncated %d rows whose %s exceeded max_chars=%d", source, truncated, fields, max_chars
        )
    if dropped == total:
        raise SiloNoRows(
            f"{source}: none of the {total} rows has a usable {fields} "
            "(all were missing, null, non-text or blank)"
        )


def classification_silo(
    rows: Iterable[tuple[object, ...]],
    source: str,
    max_chars: int = 2000,
    *,
    labels: Sequence[str] | None = None,
    unknown_labels: str = "error",
    template: str = CLASSIFICATION_TEMPLATE,
) -> Silo:
    """(text, label) rows -> classification Silo.

    ``labels`` fixes the category list shown in every prompt, in its order: the
    job's task-labels, so every organization renders the same prompt whatever
    subset its own rows hold (virtual organizations pass the corpus-wide set).
    A row whose label is outside it raises SiloUnknownLabel naming the first
    rows (``unknown_labels="error"``) or is dropped and counted (``"skip"``).
    Without ``labels`` the set is the sorted labels present in ``rows``.
    """
    _check_max_chars(max_chars)
    kept: list[tuple[str, str]] = []
    total = dropped = truncated = 0
    outside: dict[str, list[int]] = {}
    known = None if labels is None else set(labels)
    for raw_text, raw_label, *_ in rows:
        total += 1
        text, label = _as_text(raw_text), _as_label(raw_label)
        if text is None or label is None:
            dropped += 1
            continue
        if known is not None and label not in known:
            outside.setdefault(label, []).append(total)
            continue
        if len(text) > max_chars:
            text = text[:max_chars]
            truncated += 1
        kept.append((text, label))
    if total == 0:
        raise SiloNoRows(f"{source}: no rows")
    skipped = sum(len(rows_) for rows_ in outside.values())
    if skipped and unknown_labels != "skip":
        detail = "; ".join(f"{label!r} (rows {', '.join(map(str, rows_[:5]))}{', ...' if len(rows_) > 5 else ''})"
                           for label, rows_ in sorted(outside.items()))
        raise SiloUnknownLabel(f"{source}: {skipped} row(s) have a label outside the job's label set "
                               f"{list(labels or ())}: {detail}. Fix the rows, or ask for unknown-labels=skip")
    if skipped and not kept and not dropped:
        raise SiloNoRows(f"{source}: all {total} rows have a label outside the job's label set "
                         f"{list(labels or ())}: {', '.join(sorted(outside))}")
    if skipped:
        logger.warning("%s: skipped %d of %d rows whose label is outside the job's label set: %s",
                       source, skipped, total, ", ".join(sorted(outside)))
    _report(source, total - skipped, dropped, truncated, max_chars, "text/label")

    label_set = tuple(sorted({label for _, label in kept})) if labels is None else tuple(labels)
    examples = [
        Example(prompt=render_classification_prompt(text, label_set, template), answer=label, label=label)
        for text, label in kept
    ]
    return Silo(task="classification", examples=examples, labels=label_set, source=source,
                skipped_unknown_labels=skipped)


def instruction_silo(
    rows: Iterable[tuple[object, ...]], source: str, max_chars: int = 2000, *,
    template: str = INSTRUCTION_TEMPLATE, task: str = "instruction",
) -> Silo:
    """(instruction, response[, conversation]) rows -> instruction Silo.

    The prompt is ``template`` with the instruction as ``{prompt}``; a row's
    conversation (a third element, from the chat layouts) is kept on the
    example when it is more than one user turn and its answer.
    """
    _check_max_chars(max_chars)
    examples: list[Example] = []
    total = dropped = truncated = 0
    for raw_instruction, raw_response, *rest in rows:
        total += 1
        instruction, response = _as_text(raw_instruction), _as_text(raw_response)
        if instruction is None or response is None:
            dropped += 1
            continue
        turns: tuple[Turn, ...] = tuple(rest[0]) if rest and rest[0] else ()
        if len(instruction) > max_chars or len(response) > max_chars:
            instruction, response = instruction[:max_chars], response[:max_chars]
            turns = tuple((role, content[:max_chars]) for role, content in turns)
            truncated += 1
        prompt = instruction if template == INSTRUCTION_TEMPLATE else template.format(prompt=instruction)
        examples.append(Example(prompt=prompt, answer=response, label=None, messages=turns))
    if total == 0:
        raise SiloNoRows(f"{source}: no rows")
    _report(source, total, dropped, truncated, max_chars, "instruction/response")
    return Silo(task=task, examples=examples, labels=(), source=source)  # type: ignore[arg-type]
