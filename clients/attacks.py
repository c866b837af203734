"""Simulated poisoning attackers — FOR EXPERIMENTS ONLY.

This exists so that robust aggregation (median, trimmed mean, Krum,
norm-bounded) can be measured against attackers in simulation
(simulations/experiments/poisoning.py, tests/faults/). It is switched on by
the run-config key ``sim-attack = "KIND:FRACTION"``, which travels only in the
simulation settings record, and acts ONLY on virtual organizations of
Flower's Simulation Engine (those with a ``partition-id`` in their node
config). A deployed agent has a silo file and no partition id: no run config
can turn it into an attacker.

Kinds, with Δ = (trained adapter − global adapter it started from):

* ``sign-flip``: sends global − Δ (the update pointing the other way);
* ``scale10``:   sends global + 10·Δ (a boosted update);
* ``flip10``:    sends global − 10·Δ (both).

Which organizations attack is deterministic: the ``round(FRACTION × N)``
partitions (at least one) with the smallest sha256 of ``"{seed}:attacker:{id}"``,
the same in every round and every process. They train honestly and report
honest metrics; only the tensors they send are changed.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Mapping

import numpy as np

from clients.node_config import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
from protos.adapter import Adapter

log = logging.getLogger("silotune.client")

KINDS = {"sign-flip": -1.0, "scale10": 10.0, "flip10": -10.0}


def parse(spec: str) -> tuple[str, float] | None:
    """"sign-flip:0.2" → ("sign-flip", 0.2); "" → None."""
    if not spec:
        return None
    kind, _, fraction = spec.partition(":")
    try:
        share = float(fraction)
    except ValueError:
        share = -1.0
    if kind not in KINDS or not 0.0 < share < 1.0:
        raise ValueError(f"sim-attack={spec!r}: expected KIND:FRACTION with KIND one of "
                         f"{', '.join(KINDS)} and 0 < FRACTION < 1")
    return kind, share


def attackers(num_partitions: int, fraction: float, seed: int) -> set[int]:
    """The partition ids that attack (deterministic; at least one)."""
    count = max(1, round(fraction * num_partitions))
    ranked = sorted(range(num_partitions),
                    key=lambda pid: hashlib.sha256(f"{seed}:attacker:{pid}".encode()).digest())
    return set(ranked[:count])


def poison(start: Adapter, trained: Adapter, kind: str) -> Adapter:
    """What an attacker of ``kind`` sends instead of ``trained``."""
    factor = KINDS[kind]
    out: Adapter = {}
    for name, value in trained.items():
        base = start[name].astype(np.float64)
        out[name] = (base + factor * (value.astype(np.float64) - base)).astype(value.dtype)
    return out


def maybe_attack(node_config: Mapping[str, Any], spec: str, seed: int, start: Adapter, trained: Adapter) -> Adapter:
    """``trained``, or its poisoned version if this virtual organization is an attacker."""
    parsed = parse(spec)
    if parsed is None or PARTITION_ID_KEY not in node_config:
        return trained
    kind, fraction = parsed
    pid, total = int(node_config[PARTITION_ID_KEY]), int(node_config[NUM_PARTITIONS_KEY])
    if pid not in attackers(total, fraction, seed):
        return trained
    log.warning("partition %d is a SIMULATED ATTACKER (%s): sending a poisoned update", pid, kind)
    return poison(start, trained, kind)
