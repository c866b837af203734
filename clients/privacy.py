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

The agent's own ε ledger (``EpsilonLedger``): every update that leaves with
local noise is charged, before it leaves, to ``privacy-ledger.json`` in the
agent's state dir (node config ``state-dir``), across jobs and restarts. One
charge is one release of the organization's delta clipped to C with noise
z·C: the Gaussian mechanism with the organization's whole silo as the
privacy unit, q = 1 (the organization knows it takes part; no amplification
by sampling), composed in Rényi DP by strategies/accountant.py. ε is
recomputed from the charges at the policy's δ (``dp_delta``), per job and in
total. The file is 0600 and replaced atomically; a lock file serializes the
check-and-charge of concurrent rounds. Updates without local noise are not in
the ledger: a policy with an ε cap refuses them (clients/policy.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from clients.node_config import NOISE_SEED_KEY, STATE_DIR_KEY
from protos.adapter import Adapter
from strategies.accountant import RdpAccountant


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


# ---- the agent's own ε ledger -------------------------------------------------

LEDGER_FILE = "privacy-ledger.json"
LEDGER_FORMAT = "silotune-epsilon-ledger/1"


class LedgerError(RuntimeError):
    """The ε ledger file cannot be read or written: nothing is charged, nothing leaves."""


def ledger_for(node_config: Mapping[str, Any]) -> "EpsilonLedger | None":
    """The agent's ledger, in its state dir; None where the node has none (a simulation)."""
    if STATE_DIR_KEY not in node_config:
        return None
    return EpsilonLedger(Path(str(node_config[STATE_DIR_KEY])) / LEDGER_FILE)


class EpsilonLedger:
    """ε spent by one organization's locally noised updates, kept in a file.

    ``spent(job_id, delta, noise=z)`` is what ε would be, for that job and in
    total, after one more update with noise multiplier z; ``charge`` records
    it — under the file lock, after ``check`` (which may raise) has seen the
    same figures, so two concurrent rounds cannot both pass a cap that only
    one of them fits under.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- reading --
    def charges(self) -> list[dict[str, Any]]:
        with self._locked(exclusive=False):
            return self._read()

    def spent(self, job_id: str, delta: float, *, noise: float | None = None) -> tuple[float, float]:
        """(ε of ``job_id``, ε in total) at ``delta``, after one more charge with
        noise multiplier ``noise`` when given."""
        return _epsilons(self.charges(), job_id, delta, noise)

    # -- charging --
    def charge(self, job_id: str, server_round: int, noise: float, delta: float,
               check: Callable[[float, float], None] = lambda job, total: None) -> tuple[float, float]:
        """Record one update of ``job_id`` noised with multiplier ``noise`` (q = 1);
        returns (job ε, total ε) after it. ``check(job ε, total ε)`` runs first,
        under the lock; if it raises, nothing is recorded."""
        if not (math.isfinite(noise) and noise > 0):
            raise ValueError(f"a charge needs a noise multiplier > 0, got {noise!r}")
        with self._locked(exclusive=True):
            charges = self._read()
            job, total = _epsilons(charges, job_id, delta, noise)
            check(job, total)
            charges.append({"job_id": str(job_id), "round": int(server_round), "q": 1.0,
                            "noise_multiplier": float(noise),
                            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            self._write(charges)
        return job, total

    # -- the file --
    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise LedgerError(f"cannot open the ε ledger's lock {lock}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if raw.get("format") != LEDGER_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {LEDGER_FORMAT!r}")
            charges = [dict(c) for c in raw["charges"]]
            for c in charges:
                if not (isinstance(c["job_id"], str) and isinstance(c["round"], int)
                        and 0 < float(c["q"]) <= 1 and float(c["noise_multiplier"]) > 0):
                    raise ValueError(f"bad charge {c!r}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"the ε ledger {self.path} cannot be read ({err}); it is never "
                              "reset silently: repair or move it") from None
        return charges

    def _write(self, charges: list[dict[str, Any]]) -> None:
        text = json.dumps({"format": LEDGER_FORMAT, "charges": charges}, indent=1, sort_keys=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, text.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise LedgerError(f"cannot write the ε ledger {self.path}: {err.strerror}") from None


def _epsilons(charges: list[dict[str, Any]], job_id: str, delta: float,
              noise: float | None) -> tuple[float, float]:
    job, total = RdpAccountant(), RdpAccountant()
    for c in charges:
        total.step(float(c["q"]), float(c["noise_multiplier"]))
        if c["job_id"] == job_id:
            job.step(float(c["q"]), float(c["noise_multiplier"]))
    if noise is not None:
        job.step(1.0, noise)
        total.step(1.0, noise)
    return job.epsilon(delta), total.epsilon(delta)
