"""Key agreement, key derivation and share encryption.

Each organization makes two fresh X25519 key pairs per round (Bonawitz et
al. 2017, §4): the *mask* pair, whose Diffie–Hellman secret with each peer
seeds their pairwise mask, and the *encryption* pair, whose secret with each
peer keys the AEAD that carries Shamir shares to that peer through the
coordinator. Every derivation goes through HKDF-SHA256 with the session id
(job, round, attempt, coordinator nonce) as salt and the purpose and the two
indices as info, so no key or seed is ever reused across rounds, pairs or
purposes.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protos.secagg.errors import SecAggError

KEY_BYTES = 32
_NONCE_BYTES = 12

MASK = b"silotune/secagg/v1 pairwise-mask"
SHARE_ENCRYPTION = b"silotune/secagg/v1 share-encryption"
SELF_MASK = b"silotune/secagg/v1 self-mask"


def generate() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as (private, public) raw 32-byte strings."""
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def _agree(private: bytes, peer_public: bytes) -> bytes:
    if len(private) != KEY_BYTES or len(peer_public) != KEY_BYTES:
        raise SecAggError("X25519 keys are 32 bytes")
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # e.g. a low-order public key: all-zero shared secret
        raise SecAggError(f"key agreement failed: {err}") from None


def derive(secret: bytes, session: bytes, purpose: bytes, a: int, b: int) -> bytes:
    """HKDF-SHA256(secret; salt=session; info=purpose ‖ min(a,b) ‖ max(a,b)), 32 bytes."""
    low, high = sorted((a, b))
    info = purpose + struct.pack("<II", low, high)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=info).derive(secret)


def pair_key(private: bytes, peer_public: bytes, session: bytes, purpose: bytes, a: int, b: int) -> bytes:
    """The key organizations a and b both derive (each with its own private key)."""
    return derive(_agree(private, peer_public), session, purpose, a, b)


def self_mask_seed(seed: bytes, session: bytes, index: int) -> bytes:
    """The PRG seed of an organization's self-mask, from its shared secret seed."""
    return derive(seed, session, SELF_MASK, index, index)


def _aad(session: bytes, src: int, dst: int) -> bytes:
    return session + struct.pack("<II", src, dst)


def seal(key: bytes, plaintext: bytes, session: bytes, src: int, dst: int) -> bytes:
    """Encrypt-and-authenticate ``plaintext`` from ``src`` to ``dst`` (nonce ‖ ciphertext)."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, _aad(session, src, dst))


def open_sealed(key: bytes, sealed: bytes, session: bytes, src: int, dst: int) -> bytes:
    """Decrypt what ``seal`` made; raise SecAggError if it was not made for this pair and session."""
    if len(sealed) < _NONCE_BYTES + 16:
        raise SecAggError(f"sealed shares from {src} are too short")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], _aad(session, src, dst))
    except InvalidTag:
        raise SecAggError(f"shares from {src} to {dst} do not authenticate (tampered, or another session)") from None
