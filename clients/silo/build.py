"""Rows -> validated Silo: filtering, truncation and prompt rendering.

Shared by file silos (``files.load_silo``) and simulated organizations
(``virtual.virtual_silo``) so both go through exactly the same rules and
produce prompts in exactly the same format.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

from .errors import SiloNoRows
from .records import Example, Silo

logger = logging.getLogger("silotune.silo")


def render_classification_prompt(text: str, labels: Sequence[str]) -> str:
    """The user message for classification: the category list, then the text.

    Listing the categories lets a generative model answer with one of them
    verbatim, so accuracy is an exact string match on the answer.
    """
    return (
        f"Classify the text into one of these categories: {', '.join(labels)}.\n\n"
        f"Text: {text}\n\nCategory:"
    )


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
    rows: Iterable[tuple[object, object]],
    source: str,
    max_chars: int = 2000,
    *,
    labels: Sequence[str] | None = None,
) -> Silo:
    """(text, label) pairs -> classification Silo.

    ``labels`` (optional) fixes the category list shown in every prompt; virtual
    organizations pass the corpus-wide set so all of them see the same prompt
    even when a partition happens to miss a rare label. By default it is the
    sorted set of labels present in ``rows``.
    """
    _check_max_chars(max_chars)
    kept: list[tuple[str, str]] = []
    total = dropped = truncated = 0
    for raw_text, raw_label in rows:
        total += 1
        text, label = _as_text(raw_text), _as_label(raw_label)
        if text is None or label is None:
            dropped += 1
            continue
        if len(text) > max_chars:
            text = text[:max_chars]
            truncated += 1
        kept.append((text, label))
    if total == 0:
        raise SiloNoRows(f"{source}: no rows")
    _report(source, total, dropped, truncated, max_chars, "text/label")

    present = {label for _, label in kept}
    if labels is None:
        label_set = tuple(sorted(present))
    else:
        label_set = tuple(sorted(set(labels)))
        unknown = present.difference(label_set)
        if unknown:
            raise ValueError(f"{source}: labels {sorted(unknown)} are not in the given label set {label_set}")
    examples = [
        Example(prompt=render_classification_prompt(text, label_set), answer=label, label=label)
        for text, label in kept
    ]
    return Silo(task="classification", examples=examples, labels=label_set, source=source)


def instruction_silo(
    rows: Iterable[tuple[object, object]], source: str, max_chars: int = 2000
) -> Silo:
    """(instruction, response) pairs -> instruction Silo (prompt=instruction, answer=response)."""
    _check_max_chars(max_chars)
    examples: list[Example] = []
    total = dropped = truncated = 0
    for raw_instruction, raw_response in rows:
        total += 1
        instruction, response = _as_text(raw_instruction), _as_text(raw_response)
        if instruction is None or response is None:
            dropped += 1
            continue
        if len(instruction) > max_chars or len(response) > max_chars:
            instruction, response = instruction[:max_chars], response[:max_chars]
            truncated += 1
        examples.append(Example(prompt=instruction, answer=response, label=None))
    if total == 0:
        raise SiloNoRows(f"{source}: no rows")
    _report(source, total, dropped, truncated, max_chars, "instruction/response")
    return Silo(task="instruction", examples=examples, labels=(), source=source)
