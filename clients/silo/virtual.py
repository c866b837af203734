"""Simulated organizations: deterministic, label-skewed, disjoint corpus partitions.

Each group (BBC label or FAQ category; sorted) is "home" to organization
``group_index % num_partitions``. An organization draws about ``skew`` of its
records from its home groups and the rest from the other groups in proportion
to their size, which mimics real silos: a law firm mostly holds contracts,
a broadcaster mostly news, but both hold some of everything.

The whole assignment for (dataset, num_partitions, skew, max_records, seed) is
computed once and cached, so each of the N virtual organizations only slices
its share; partitions are disjoint by construction (each group's shuffled
records are dealt out consecutively).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from protos.task_spec import TaskSpec

from .build import classification_silo, instruction_silo
from .corpora import load_bbc_news, load_construction_faq
from .records import Silo

logger = logging.getLogger("silotune.silo")

DATASETS: tuple[str, ...] = ("bbc-news", "construction-faq")


def _corpus(dataset: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(prompt-side, answer-side) pairs plus each record's group for ``dataset``."""
    if dataset == "bbc-news":
        rows = load_bbc_news()
        return rows, [label for _, label in rows]
    faq = load_construction_faq("en")
    return [(q, a) for q, a, _ in faq], [category for _, _, category in faq]


def _apportion(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Split the integer ``total`` into parts roughly proportional to ``weights``, each <= ``caps``.

    Repeats "floor of the proportional share" over the entries that still
    have room, then hands the last few units out by largest fractional share.
    When no weighted entry has room left, the rest is spread by free room.
    Requires ``caps.sum() >= total``.
    """
    weights = np.asarray(weights, dtype=float)
    caps = np.asarray(caps, dtype=np.int64)
    if caps.sum() < total:
        raise AssertionError("apportion: not enough capacity")  # a bug, never bad input
    alloc = np.zeros(len(weights), dtype=np.int64)
    remaining = int(total)
    while remaining > 0:
        room = caps - alloc
        w = np.where(room > 0, weights, 0.0)
        if w.sum() <= 0:
            w = room.astype(float)
        exact = remaining * w / w.sum()
        take = np.minimum(np.floor(exact).astype(np.int64), room)
        if take.sum() == 0:
            # Every share is < 1 unit: give single units, largest fraction first.
            for i in np.argsort(-exact, kind="stable"):
                if remaining == 0:
                    break
                if w[i] > 0 and room[i] > 0:
                    alloc[i] += 1
                    remaining -= 1
            continue
        alloc += take
        remaining -= int(take.sum())
    return alloc


def _quotas(sizes: np.ndarray, num_partitions: int, per_org: int, skew: float) -> np.ndarray:
    """How many records of each group each organization gets: int array [orgs, groups].

    1. Desired mix per org: ``skew`` on its home groups (never less than their
       natural share, so a small skew means IID rather than "avoid home"),
       the rest on the other groups, each side in proportion to group size.
    2. Where a group is oversubscribed, its home org is served first (that
       is what makes the skew visible), the others share what is left.
    3. Orgs left short take the remaining records, preferring their own mix,
       so every org ends with exactly ``per_org`` records.
    """
    num_groups = len(sizes)
    home = np.arange(num_groups) % num_partitions
    weights = np.zeros((num_partitions, num_groups))
    for p in range(num_partitions):
        is_home = home == p
        if not is_home.any() or is_home.all():
            weights[p] = sizes / sizes.sum()  # no home group, or nothing else: IID
            continue
        share = max(skew, sizes[is_home].sum() / sizes.sum())
        weights[p, is_home] = share * sizes[is_home] / sizes[is_home].sum()
        weights[p, ~is_home] = (1 - share) * sizes[~is_home] / sizes[~is_home].sum()

    desired = np.stack([_apportion(per_org, weights[p], sizes) for p in range(num_partitions)])
    quotas = np.zeros_like(desired)
    for g in range(num_groups):
        h = home[g]
        quotas[h, g] = min(desired[h, g], sizes[g])
        others = np.arange(num_partitions) != h
        supply = sizes[g] - quotas[h, g]
        demand = desired[others, g]
        quotas[others, g] = _apportion(min(int(demand.sum()), int(supply)), demand, demand)

    leftover = sizes - quotas.sum(axis=0)
    for p in range(num_partitions):
        deficit = per_org - int(quotas[p].sum())
        if deficit > 0:
            extra = _apportion(deficit, weights[p], leftover)
            quotas[p] += extra
            leftover -= extra
    return quotas


@functools.lru_cache(maxsize=32)
def _assignment(
    dataset: str, num_partitions: int, skew: float, max_records: int | None, seed: int
) -> tuple[tuple[int, ...], ...]:
    """Corpus row indices of every organization (disjoint, equal sizes, seeded)."""
    rows, groups = _corpus(dataset)
    names = sorted(set(groups))
    members = [[i for i, g in enumerate(groups) if g == name] for name in names]
    sizes = np.array([len(m) for m in members], dtype=np.int64)

    per_org = len(rows) // num_partitions
    if max_records is not None:
        if max_records > per_org:
            logger.warning(
                "virtual:%s: max_records=%d exceeds %d records per organization for %d "
                "disjoint partitions; using %d", dataset, max_records, per_org, num_partitions, per_org,
            )
        per_org = min(per_org, max_records)

    quotas = _quotas(sizes, num_partitions, per_org, skew)
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(np.array(m, dtype=np.int64)) for m in members]
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for g, pool in enumerate(shuffled):
        start = 0
        for p in range(num_partitions):  # deal consecutive slices: disjoint by construction
            parts[p].extend(pool[start : start + quotas[p, g]].tolist())
            start += int(quotas[p, g])
    # Mix the groups inside each org so a prefix of its silo is not all one label.
    return tuple(tuple(rng.permutation(np.array(part, dtype=np.int64)).tolist()) for part in parts)


def virtual_silo(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    *,
    skew: float = 0.8,
    max_records: int | None = None,
    seed: int = 0,
    spec: TaskSpec | None = None,
) -> Silo:
    """The silo of simulated organization ``partition_id`` out of ``num_partitions``.

    "bbc-news" gives a classification silo (labels: the corpus-wide label set,
    so every org renders the same prompt); "construction-faq" gives an
    instruction silo (question -> answer) skewed over FAQ categories. Each org
    gets ``max_records`` records if given (capped so partitions stay
    disjoint), else ``len(corpus) // num_partitions``. The job's ``spec``
    (its label set, unknown-label rule and prompt template) applies as it does
    to a file silo; without labels in it, bbc-news uses the corpus-wide set.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive int, got {num_partitions!r}")
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) \
            or not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id!r}")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], got {skew!r}")
    if max_records is not None and (isinstance(max_records, bool) or max_records < 1):
        raise ValueError(f"max_records must be a positive int or None, got {max_records!r}")
    rows, groups = _corpus(dataset)
    if num_partitions > len(rows):
        raise ValueError(f"num_partitions={num_partitions} exceeds the {len(rows)} records of {dataset!r}")

    indices = _assignment(dataset, num_partitions, float(skew), max_records, seed)[partition_id]
    source = f"virtual:{dataset}:{partition_id}/{num_partitions}"
    chosen = [rows[i] for i in indices]
    spec = spec or TaskSpec()
    if dataset == "bbc-news":
        return classification_silo(chosen, source, labels=spec.labels or sorted(set(groups)),
                                   unknown_labels=spec.unknown_labels, template=spec.template_for("classification"))
    return instruction_silo(chosen, source, template=spec.template_for("instruction"))
