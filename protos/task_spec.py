"""The job's task: what every organization learns, and how its examples look.

It is the projection of the task settings of ``JobSettings`` (``task``,
``task-labels``, ``unknown-labels``, ``prompt-template``, ``system-prompt``,
``metric``, ``max-length``). Those are round-scoped, so the spec travels in
every instruction and each organization renders its examples from it, not
from what its own file happens to hold: organizations with different label
subsets still train on the same prompt. Its ``fingerprint`` goes into the
specialist's provenance, so a specialist names the exact task it learned.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass
from typing import Any

#: what a job can ask; "auto" lets each organization's file decide (instruction or classification)
KINDS = ("auto", "classification", "instruction", "chat")
METRICS = ("auto", "accuracy", "macro-f1", "exact-match", "perplexity")
UNKNOWN_LABEL_RULES = ("error", "skip")

#: the built-in user message of each kind; a job's prompt-template replaces it
CLASSIFICATION_TEMPLATE = "Classify the text into one of these categories: {labels}.\n\nText: {text}\n\nCategory:"
INSTRUCTION_TEMPLATE = "{prompt}"
#: the fields a template of each kind may use (and the one it must)
TEMPLATE_FIELDS = {"classification": ({"labels", "text"}, "text"), "instruction": ({"prompt"}, "prompt")}


class TaskSpecError(ValueError):
    """A task spec that cannot be used, with the setting named."""


@dataclass(frozen=True)
class TaskSpec:
    kind: str = "auto"
    labels: tuple[str, ...] = ()
    unknown_labels: str = "error"
    prompt_template: str = ""
    system_prompt: str = ""
    metric: str = "auto"
    max_length: int = 160

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TaskSpecError(f"task={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.metric not in METRICS:
            raise TaskSpecError(f"metric={self.metric!r}: expected one of {', '.join(METRICS)}")
        if self.unknown_labels not in UNKNOWN_LABEL_RULES:
            raise TaskSpecError(f"unknown-labels={self.unknown_labels!r}: expected error or skip")
        if len(set(self.labels)) != len(self.labels) or any(not label.strip() for label in self.labels):
            raise TaskSpecError(f"task-labels: labels must be distinct and not blank, got {list(self.labels)}")
        if self.labels and self.kind not in ("auto", "classification"):
            raise TaskSpecError(f"task-labels are for classification, not task={self.kind!r}")
        if self.metric in ("accuracy", "macro-f1") and self.kind in ("instruction", "chat"):
            raise TaskSpecError(f"metric={self.metric!r} needs a classification task, not task={self.kind!r}")
        if self.prompt_template:
            if self.kind not in TEMPLATE_FIELDS:
                raise TaskSpecError("prompt-template needs task=classification or task=instruction "
                                    f"(chat rows are used as they are), not task={self.kind!r}")
            _check_template(self.prompt_template, self.kind)

    @classmethod
    def from_config(cls, cfg: Any) -> "TaskSpec":
        """From anything with the task settings as attributes (JobSettings, RoundConfig)."""
        return cls(kind=cfg.task, labels=parse_labels(cfg.task_labels), unknown_labels=cfg.unknown_labels,
                   prompt_template=cfg.prompt_template, system_prompt=cfg.system_prompt, metric=cfg.metric,
                   max_length=int(cfg.max_length))

    def template_for(self, kind: str) -> str:
        """The user-message template for examples of ``kind`` (classification or instruction)."""
        if self.prompt_template:
            return self.prompt_template
        return CLASSIFICATION_TEMPLATE if kind == "classification" else INSTRUCTION_TEMPLATE

    def headline_metric(self, kind: str) -> str:
        """The metric the report leads with, for a silo of ``kind``."""
        if self.metric != "auto":
            return self.metric
        return "accuracy" if kind == "classification" else "perplexity"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "labels": list(self.labels)}

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the spec: equal specs, equal prompts."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_labels(text: str) -> tuple[str, ...]:
    """``task-labels``: a JSON array (labels may hold commas) or comma-separated names."""
    text = text.strip()
    if not text:
        return ()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise TaskSpecError(f"task-labels looks like a JSON array but is not one: {err}") from None
        if not isinstance(values, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                   for v in values):
            raise TaskSpecError("task-labels: a JSON array of strings (or integers)")
        return tuple(str(v).strip() for v in values)
    return tuple(part.strip() for part in text.split(","))


def _check_template(template: str, kind: str) -> None:
    allowed, required = TEMPLATE_FIELDS[kind]
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise TaskSpecError(f"prompt-template is not a valid template ({err}); write {{{{ and }}}} for braces") \
            from None
    unknown = used - allowed
    if unknown:
        raise TaskSpecError(f"prompt-template uses {sorted(unknown)}; a {kind} template may use "
                            f"{', '.join('{' + f + '}' for f in sorted(allowed))}")
    if required not in used:
        raise TaskSpecError(f"prompt-template must contain {{{required}}}")
