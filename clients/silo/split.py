"""Deterministic train/test split of a silo.

The split is decided per example by a hash of its content (not its row
position), so an organization that re-exports its data in a different order,
or appends rows, keeps the same held-out examples, and exact duplicates always
land on the same side (no train/test leakage through duplicates).
"""

from __future__ import annotations

import hashlib
import math

from .records import Example, Silo


def example_hash(example: Example, seed: int = 0) -> float:
    """Map an example to a uniform float in [0, 1) from sha256(seed, prompt, answer)."""
    digest = hashlib.sha256(f"{seed}\x00{example.prompt}\x00{example.answer}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_silo(silo: Silo, test_fraction: float = 0.2, seed: int = 0) -> tuple[Silo, Silo]:
    """Return ``(train, test)``; an example goes to test when its hash < test_fraction.

    With at least 2 examples both sides get at least one (the smallest hash is
    moved to test, or the largest to train), so evaluation never divides by
    zero. Both halves keep the original task, full label set and source; the
    relative order of examples is preserved.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or math.isnan(test_fraction) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in the open interval (0, 1), got {test_fraction!r}")
    hashes = [example_hash(ex, seed) for ex in silo.examples]
    in_test = [h < test_fraction for h in hashes]
    if len(hashes) >= 2:
        if not any(in_test):
            in_test[min(range(len(hashes)), key=hashes.__getitem__)] = True
        elif all(in_test):
            in_test[max(range(len(hashes)), key=hashes.__getitem__)] = False
    train = [ex for ex, t in zip(silo.examples, in_test) if not t]
    test = [ex for ex, t in zip(silo.examples, in_test) if t]

    def half(examples: list[Example]) -> Silo:
        return Silo(task=silo.task, examples=examples, labels=silo.labels, source=silo.source)

    return half(train), half(test)
