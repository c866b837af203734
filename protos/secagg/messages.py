"""What the parties of a session send each other, and the conventions both
sides must compute identically (mask signs, seed commitments)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PublicKeys:
    """Stage 1, organization → everyone (via the coordinator)."""

    mask: bytes        # X25519: seeds the pairwise masks
    encryption: bytes  # X25519: keys the AEAD that carries shares


@dataclass(frozen=True)
class SealedShares:
    """Stage 2, organization → each holder (via the coordinator, which cannot open them)."""

    sealed: dict[int, bytes]   # holder index -> sealed (seed share ‖ mask-key share)
    seed_commitment: bytes     # SHA-256 of the self-mask seed, to check its reconstruction


@dataclass(frozen=True)
class UnmaskShares:
    """Stage 4, organization → coordinator: never both shares of one organization."""

    seed: dict[int, bytes]       # survivor index -> share of its self-mask seed
    mask_key: dict[int, bytes]   # dropped index -> share of its mask private key
    #: when asked: Σ_{u dropped} sign·PRG(s_iu), the masks this survivor shares with the dropped
    #: ones, so that the coordinator need not expand them itself (None: not asked, or no dropout)
    correction: np.ndarray | None = None


def seed_commitment(session_id: bytes, seed: bytes) -> bytes:
    return hashlib.sha256(b"silotune/secagg/v1 seed" + session_id + seed).digest()


def pairwise_sign(i: int, j: int) -> int:
    """The sign with which organization i adds the mask it shares with j
    (+ for i < j, − for i > j: the pair's two masks cancel in the sum)."""
    return 1 if i < j else -1
