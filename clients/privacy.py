"""Differential privacy at the organization, before anything is sent.

When the coordinator's strategy places the noise locally (dp-fedavg with
``noise_placement="local"``; see strategies/dp_fedavg.py), the round config
carries ``dp_clip`` C and ``dp_noise`` z. The organization then sends

    start + clip(trained − start, C) + N(0, (zC)² I)

over the factors it shares, where ``start`` is the global it started from (at
its own rank) and the L2 norm is taken over all shared tensors at once. With
``dp_noise`` 0 it only clips (what secure aggregation will need: the
coordinator then adds the noise once to the secure sum).

The noise generator is seeded from the operating system's entropy: the
coordinator knows the job seed, the round and the organization's name, so a
seed derived from them would let it subtract the noise. A node may set
``dp-noise-seed`` in its node config to make its noise reproducible
(simulations and tests), knowing that whoever knows it can remove the noise.
Nothing about the update's norm before clipping is reported: it depends on
the data.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Mapping

import numpy as np

from clients.node_config import NOISE_SEED_KEY
from protos.adapter import Adapter


def noise_generator(node_config: Mapping[str, Any], server_round: int, org: str) -> np.random.Generator:
    """Secret entropy, or a generator derived from ``dp-noise-seed`` when the node sets one."""
    if NOISE_SEED_KEY in node_config:
        digest = hashlib.sha256(f"{int(node_config[NOISE_SEED_KEY])}:{server_round}:{org}".encode()).digest()
        return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def privatize(start: Adapter, trained: Adapter, names: list[str] | tuple[str, ...], clip_norm: float,
              noise_multiplier: float, rng: np.random.Generator) -> Adapter:
    """``trained`` with the tensors ``names`` replaced by start + clipped delta + noise.

    The other tensors (factors kept local) are returned as they are."""
    if not clip_norm > 0:
        raise ValueError(f"dp_clip must be > 0, got {clip_norm!r}")
    if not noise_multiplier >= 0:
        raise ValueError(f"dp_noise must be >= 0, got {noise_multiplier!r}")
    names = sorted(names)  # a fixed order for the noise stream
    deltas = {k: trained[k].astype(np.float64) - start[k].astype(np.float64) for k in names}
    norm = float(np.sqrt(sum(float(np.vdot(d, d)) for d in deltas.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip_norm
    out = dict(trained)
    for key in names:
        delta = deltas.pop(key) * scale
        if std > 0:
            delta += rng.standard_normal(delta.shape) * std
        out[key] = (start[key].astype(np.float64) + delta).astype(trained[key].dtype)
    return out
