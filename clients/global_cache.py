"""The globals this process has decoded, for GLOBAL messages sent as a delta (job setting ``global-delta``).

One cache per process (the agent's resident trainer, a simulation actor), keyed by
digest (protos/global_delta.py), so every virtual organization of an actor draws
on the same copies. It keeps the last ``KEEP`` globals: the coordinator sends a
difference only from its current or its previous global, so two are enough, and
memory stays at two adapters whatever the number of organizations or jobs.
The held copies are read-only (a base that something wrote into would no longer
be the global its digest names); callers get their own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from protos import global_delta
from protos.adapter import Adapter
from protos.silotune.v1 import update_pb2 as pb

KEEP = 2


class GlobalCache:
    """Globals by digest, the most recent ``keep`` of them; thread-safe."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._held: OrderedDict[str, Adapter] = OrderedDict()

    def resolve(self, header: pb.UpdateHeader, payload: Adapter) -> tuple[pb.UpdateHeader, Adapter]:
        """The global a GLOBAL message stands for, with a header whose tensors describe it.

        Without ``global_digest`` (global-delta off) the message is the global: returned as
        it is. Otherwise the global is the payload (``base_digest`` empty) or the base plus
        the payload (no payload: the base itself); its digest must be ``global_digest``
        (GlobalDigestMismatch), the base must be held here (GlobalBaseMissing). The global
        is then held, the oldest dropped beyond ``keep``.
        """
        if not header.global_digest:
            return header, payload
        if header.base_digest:
            with self._lock:
                base = self._held.get(header.base_digest)
                holds = [d[:12] for d in self._held]
            if base is None:
                raise global_delta.GlobalBaseMissing(
                    f"round {header.round}: the global is sent as a difference from {header.base_digest[:12]}, "
                    f"which this process does not hold (it holds {holds or 'none'}); the coordinator "
                    "sends the whole global next time")
            # no payload: the base itself, copied (the held copies stay read-only; the caller may write its own)
            adapter = global_delta.apply_delta(base, payload) if payload else {n: v.copy() for n, v in base.items()}
        else:
            adapter = {name: np.asarray(values, dtype=np.float32) for name, values in payload.items()}
        got = global_delta.digest(adapter)
        if got != header.global_digest:
            raise global_delta.GlobalDigestMismatch(
                f"round {header.round}: the global rebuilt here has digest {got[:12]}, the message announces "
                f"{header.global_digest[:12]}")
        self.hold(got, adapter)
        resolved = pb.UpdateHeader()
        resolved.CopyFrom(header)
        del resolved.tensors[:]
        resolved.tensors.extend(pb.TensorSpec(name=name, shape=list(adapter[name].shape), dtype="float32",
                                              encoding=pb.FP32) for name in sorted(adapter))
        return resolved, adapter

    def hold(self, digest: str, adapter: Adapter) -> None:
        """Hold ``adapter`` (read-only copies) under ``digest``; the most recent ``keep`` stay."""
        with self._lock:
            if digest in self._held:
                self._held.move_to_end(digest)
                return
            frozen = {}
            for name, values in adapter.items():
                copy = np.array(values, dtype=np.float32, copy=True)
                copy.setflags(write=False)
                frozen[name] = copy
            self._held[digest] = frozen
            while len(self._held) > self.keep:
                self._held.popitem(last=False)

    def held(self) -> list[str]:
        """The digests held, oldest first."""
        with self._lock:
            return list(self._held)

    def clear(self) -> None:
        """Forget every global (a restarted organization; tests)."""
        with self._lock:
            self._held.clear()


#: this process's cache: every organization the process serves draws on it
PROCESS_CACHE = GlobalCache()


def resolve(header: pb.UpdateHeader, payload: Adapter) -> tuple[pb.UpdateHeader, Adapter]:
    """``GlobalCache.resolve`` on this process's cache."""
    return PROCESS_CACHE.resolve(header, payload)
