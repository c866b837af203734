"""The global adapter sent as a difference from one the organization holds (job setting ``global-delta``).

Both sides name a global by ``digest``: sha256 over its float32 values, tensors in
name order, each prefixed by its name and shape. A GLOBAL message's header says
the digest the receiver must end up holding (``global_digest``) and, for a delta,
the digest of the global it is a difference from (``base_digest``); the receiver
rebuilds ``base + decoded`` in float32 (``apply_delta``) — the same operation, on
the same bytes, that the coordinator used to make its global — and checks the
digest. A train reply's header, and an evaluate reply's organization record
(``EVAL_DIGEST_KEY``), carry the digest of the global the organization started
from: the only thing the coordinator learns of what it holds.

Each failure has its name, and is never silent: ``GlobalBaseMissing`` (the
receiver does not hold the base) and ``GlobalDigestMismatch`` (what it rebuilt,
or was sent in full, is not the announced global).
"""

from __future__ import annotations

import hashlib

import numpy as np

from protos.adapter import Adapter

#: an evaluate reply's organization ConfigRecord: the digest of the global it scored
EVAL_DIGEST_KEY = "global_digest"


class GlobalDeltaError(RuntimeError):
    """A GLOBAL message under global-delta that cannot become the announced global."""


class GlobalBaseMissing(GlobalDeltaError):
    """The message is a difference from a global this organization does not hold (any more)."""


class GlobalDigestMismatch(GlobalDeltaError):
    """The global rebuilt (or received in full) is not the one the message announces."""


def digest(adapter: Adapter) -> str:
    """sha256 (hex) of ``adapter`` as float32: names in sorted order, each with its shape and values.
    Equal digests mean equal values bit for bit (NaN payloads and the sign of zero included)."""
    h = hashlib.sha256()
    for name in sorted(adapter):
        values = np.ascontiguousarray(adapter[name], dtype="<f4")
        h.update(name.encode() + b"\0")
        h.update(np.asarray(values.shape, dtype="<i8").tobytes())
        h.update(values.reshape(-1).view(np.uint8))
    return h.hexdigest()


def apply_delta(base: Adapter, delta: Adapter) -> Adapter:
    """``base + delta`` per tensor, in float32: what the coordinator holds and what a receiver
    rebuilds from the same decoded delta. GlobalDigestMismatch if names or shapes differ."""
    if set(base) != set(delta):
        extra, missing = sorted(set(delta) - set(base))[:3], sorted(set(base) - set(delta))[:3]
        raise GlobalDigestMismatch(f"the delta's tensors are not the base's: extra {extra}, missing {missing}")
    out: Adapter = {}
    for name in sorted(base):
        b = np.asarray(base[name], dtype=np.float32)
        d = np.asarray(delta[name], dtype=np.float32)
        if b.shape != d.shape:
            raise GlobalDigestMismatch(f"{name}: delta {d.shape} vs base {b.shape}")
        out[name] = np.add(b, d, dtype=np.float32)
    return out


def difference(target: Adapter, base: Adapter) -> Adapter:
    """``target − base`` per tensor in float32 (the coordinator's side of ``apply_delta``)."""
    if set(target) != set(base):
        raise GlobalDeltaError(f"the new global's tensors differ from the held one's: "
                               f"{sorted(set(target) ^ set(base))[:3]}")
    return {name: np.subtract(np.asarray(target[name], dtype=np.float32),
                              np.asarray(base[name], dtype=np.float32), dtype=np.float32) for name in sorted(target)}
