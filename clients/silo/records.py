"""Plain data records shared by the silo loaders, the splitter and training.

Kept free of any I/O so that training code (and tests) can build silos in
memory without touching files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Task = Literal["instruction", "classification", "chat"]

#: The task kinds a silo can hold; ``load_silo(task=...)`` also accepts "auto".
#: A chat silo is an instruction silo whose rows had to be conversations.
TASKS: tuple[str, ...] = ("instruction", "classification", "chat")

#: one turn of a conversation: (role, content), role one of system/user/assistant/tool
Turn = tuple[str, str]


@dataclass(frozen=True)
class Example:
    """One supervised chat turn.

    ``prompt`` is the user message exactly as the model sees it (for
    classification it is already rendered with the category list), and
    ``answer`` is what the model is trained to produce. Frozen so examples can
    be hashed, deduplicated and shared between train/test views safely.
    """

    prompt: str
    answer: str
    label: str | None = None  # class label for classification silos, None for instruction
    #: a conversation with more than one user turn or a system turn, up to and
    #: including its answer; it is then encoded with the model's chat template,
    #: the loss on every assistant turn (``prompt`` is its flattened text, for
    #: display and the split). Empty for a single exchange.
    messages: tuple[Turn, ...] = ()


@dataclass
class Silo:
    """An organization's validated examples plus what is needed to evaluate them.

    ``labels`` is the full, sorted label set for classification (kept on both
    halves of a split, so accuracy is computed against the same categories),
    and ``()`` for instruction silos. ``source`` is the file path or
    ``"virtual:<dataset>:<partition>/<num_partitions>"`` for simulated orgs;
    it only serves logging and reports.
    """

    task: Task
    examples: list[Example]
    labels: tuple[str, ...]
    source: str
    #: rows dropped because their label is outside the job's label set (unknown-labels = skip)
    skipped_unknown_labels: int = 0

    def __len__(self) -> int:
        return len(self.examples)
