"""The public parameters of one secure-aggregation session (one round attempt).

The coordinator fixes them and sends them with the round's first message;
each organization checks them before taking part (``validate``):

* ``session_id`` — unique bytes (job, round, attempt, a fresh nonce) bound into
  every key derivation and every sealed share, so nothing replays across
  sessions;
* ``participants`` — the organizations' indices (1..N), which are also their
  Shamir evaluation points;
* ``threshold`` t — shares needed to reconstruct a secret. t > N/2 (a
  coordinator cannot get two disjoint groups to reveal both of an
  organization's secrets) and t ≥ 2; up to N − t organizations may drop after
  masking and the sum still unmasks;
* ``ring`` — the quantization and ring (``ring.RingSpec``), for N inputs;
* ``length`` — P, the number of update values (the ring vector has P + 1
  elements, the last carries the weight);
* ``prg`` — the mask PRG (``prg.PRGS``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from protos.secagg.errors import SecAggError, SessionRefused
from protos.secagg.prg import DEFAULT_PRG, PRGS
from protos.secagg.ring import RingSpec

MIN_SESSION_ID = 16


@dataclass(frozen=True)
class Session:
    session_id: bytes
    participants: tuple[int, ...]
    threshold: int
    ring: RingSpec
    length: int
    prg: str = DEFAULT_PRG

    @property
    def vector_length(self) -> int:
        """Ring elements per masked input: the P values and the weight."""
        return self.length + 1

    def validate(self) -> None:
        if len(self.session_id) < MIN_SESSION_ID:
            raise SecAggError(f"session id of {len(self.session_id)} bytes; at least {MIN_SESSION_ID}")
        n = len(self.participants)
        if len(set(self.participants)) != n or any(not 1 <= i < 2**31 for i in self.participants):
            raise SecAggError("participant indices must be distinct and in 1..2^31-1")
        if n < 2:
            raise SecAggError("secure aggregation needs at least 2 organizations")
        if not (2 * self.threshold > n and self.threshold >= 2):
            raise SecAggError(f"threshold {self.threshold} for {n} organizations: need t > N/2 and t >= 2")
        if self.threshold > n:
            raise SecAggError(f"threshold {self.threshold} exceeds the {n} organizations")
        if self.ring.max_clients < n:
            raise SecAggError(f"ring sized for {self.ring.max_clients} inputs, session has {n}")
        self.ring.validate()
        if self.length < 1:
            raise SecAggError("empty update")
        if self.prg not in PRGS:
            raise SecAggError(f"unknown PRG {self.prg!r}; valid: {list(PRGS)}")

    def digest(self) -> bytes:
        """SHA-256 of every public parameter: what an organization's signatures bind to,
        so peers that verify them know they were all shown the same session."""
        return hashlib.sha256(b"silotune/secagg/v2 session" + self.to_json().encode()).digest()

    def check_floor(self, floor: int) -> None:
        """SessionRefused unless this session cannot unmask fewer than ``floor`` inputs.

        An honest organization reveals shares only for a survivor set of at least t
        (``MaskingClient.unmask``), and under a pinned roster only a set that at least t
        organizations signed (so every honest organization was shown the same one); the
        sum the coordinator unmasks then holds at least t inputs. So: N >= floor and
        t >= floor (with t > N/2 from ``validate``: no organization's two secrets are
        both revealed). A 2-party session — one organization and a participant the
        coordinator runs — is what floor 3 refuses."""
        n, t = len(self.participants), self.threshold
        if n < floor:
            raise SessionRefused(f"a session of {n} organizations, below this organization's floor of {floor}: "
                                 "its update could be read from the sum")
        if t < floor:
            raise SessionRefused(f"threshold {t} would let a sum of {t} inputs be unmasked, below this "
                                 f"organization's floor of {floor}")

    @staticmethod
    def default_threshold(n: int) -> int:
        """The smallest valid threshold, ⌊N/2⌋ + 1: tolerates the most dropouts."""
        return max(2, n // 2 + 1)

    # ---- wire --------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "session_id": self.session_id.hex(),
            "participants": list(self.participants),
            "threshold": self.threshold,
            "ring": self.ring.to_dict(),
            "length": self.length,
            "prg": self.prg,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Session":
        try:
            raw = json.loads(text)
            session = cls(
                session_id=bytes.fromhex(raw["session_id"]),
                participants=tuple(int(i) for i in raw["participants"]),
                threshold=int(raw["threshold"]),
                ring=RingSpec.from_dict(raw["ring"]),
                length=int(raw["length"]),
                prg=str(raw["prg"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, SecAggError):
                raise
            raise SecAggError(f"session parameters do not parse: {err}") from None
        session.validate()
        return session
