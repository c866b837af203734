"""`silotune agent check`: what an organization's IT sees before joining.

Loads and validates the silo file exactly as a round would, then summarizes
it: schema, counts, the train/test split, label distribution, token lengths
and how many examples would be truncated. Nothing is sent anywhere; the
summary holds counts and statistics only, never a record.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.formatting import encode_example
from clients.silo import load_silo, split_silo


@dataclass
class SiloSummary:
    path: str
    task: str
    rows: int
    train: int
    test: int
    labels: dict[str, int] = field(default_factory=dict)          # label -> count (classification)
    tokens: dict[str, float] = field(default_factory=dict)        # min / p50 / p95 / max of prompt+answer
    truncated: int = 0
    max_length: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_silo(path: str | Path, *, model: str = "smollm2-135m", max_length: int = 160,
               test_fraction: float = 0.2, seed: int = 0) -> SiloSummary:
    """Validate and summarize a silo file (raises the named SiloError on a bad file)."""
    from runtime.base_model import load_tokenizer

    silo = load_silo(path)
    train, test = split_silo(silo, test_fraction=test_fraction, seed=seed)
    tokenizer = load_tokenizer(model)
    full = [encode_example(tokenizer, e.prompt, e.answer, max_length=1_000_000) for e in silo.examples]
    lengths = np.array([len(e.input_ids) for e in full])
    return SiloSummary(
        path=str(path),
        task=silo.task,
        rows=len(silo),
        train=len(train),
        test=len(test),
        labels=dict(sorted(Counter(e.label for e in silo.examples if e.label is not None).items())),
        tokens={"min": float(lengths.min()), "p50": float(np.percentile(lengths, 50)),
                "p95": float(np.percentile(lengths, 95)), "max": float(lengths.max())},
        truncated=int((lengths > max_length).sum()),
        max_length=max_length,
    )
