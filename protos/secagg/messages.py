"""What the parties of a session send each other, and the conventions both
sides must compute identically (mask signs, seed commitments)."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PublicKeys:
    """Stage 1, organization → everyone (via the coordinator)."""

    mask: bytes        # X25519: seeds the pairwise masks
    encryption: bytes  # X25519: keys the AEAD that carries shares
    #: the organization's node key (OpenSSH line, ``identity.identity_of``) and its signature of
    #: ``identity.advertisement_message``; both empty when the organization has no node key (simulation)
    identity: bytes = b""
    signature: bytes = b""

    @property
    def signed(self) -> bool:
        return bool(self.identity)

    def same_keys(self, other: "PublicKeys") -> bool:
        """The same two X25519 keys (signatures are randomized: they are not compared)."""
        return (self.mask, self.encryption) == (other.mask, other.encryption)


@dataclass(frozen=True)
class SealedShares:
    """Stage 2, organization → each holder (via the coordinator, which cannot open them)."""

    sealed: dict[int, bytes]   # holder index -> sealed (seed share ‖ mask-key share)
    seed_commitment: bytes     # SHA-256 of the self-mask seed, to check its reconstruction
    #: holder index (every member of the roster, this dealer included) -> the commitments
    #: (``share_commitment``) of the seed share and of the mask-key share dealt to it, so that a
    #: share revealed at unmask can be checked and a bad one attributed to whoever revealed it
    share_commitments: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)


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


SEED_SHARE, KEY_SHARE = 0, 1


def share_commitment(session_id: bytes, dealer: int, holder: int, kind: int, share: bytes) -> bytes:
    """SHA-256 binding one Shamir share to its dealer, holder and kind (``SEED_SHARE`` or
    ``KEY_SHARE``). Hiding: a share is a uniform 521-bit value given fewer than t others,
    and checking a guess needs the dealer's 256-bit secret."""
    return hashlib.sha256(b"silotune/secagg/v2 share" + session_id
                          + struct.pack("<IIB", dealer, holder, kind) + share).digest()


def pairwise_sign(i: int, j: int) -> int:
    """The sign with which organization i adds the mask it shares with j
    (+ for i < j, − for i > j: the pair's two masks cancel in the sum)."""
    return 1 if i < j else -1
