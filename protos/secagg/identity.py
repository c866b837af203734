"""Who signs what in a secure-aggregation session, and whom an organization trusts.

Against a malicious coordinator, an organization must know that the keys it
shares its secrets with belong to real peer organizations, not to parties the
coordinator runs (Bonawitz et al. 2017, §6, the active-adversary variant).
So each organization signs, with its **node key** (the ECDSA key Flower's node
authentication already uses: ``silotune pki org-key``, P-384 by default, any
NIST curve), what it advertises:

* ``advertisement_message`` — the session (its digest: id, participants,
  threshold, ring, P, PRG), its own index and its two X25519 public keys;
* ``consistency_message`` — before unmasking, the survivors and the dropped
  organizations it was told about, so that the coordinator cannot show
  different organizations different survivor sets.

Identities travel as the OpenSSH public-key line without its comment
(``ecdsa-sha2-nistp384 AAAA…``): the format of ``ORG.pub``, of enrollment,
and of ``ssh-keygen -l`` fingerprints (``fingerprint``).

A peer's signature only helps if the verifier learns that peer's key from
somewhere other than the coordinator: ``TrustedPeers`` is the roster an
organization pins, a text file distributed out of band — one peer per line,
either its OpenSSH public key (``ORG.pub`` as written) or its fingerprint
``SHA256:…``, optionally followed by a name; ``#`` comments and blank lines
are ignored. Without it, signatures are not checked (the coordinator could
name any key), and the session floor is the only defence left.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass, field
from typing import Iterable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protos.secagg.errors import SecAggError

ADVERTISE_TAG = b"silotune/secagg/v2 advertise"
CONSISTENCY_TAG = b"silotune/secagg/v2 consistency"
#: the largest identity and signature accepted on the wire (P-521 with room to spare)
MAX_IDENTITY_BYTES = 512
MAX_SIGNATURE_BYTES = 160
_NIST = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def identity_of(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The wire identity of a node key: its public key as one OpenSSH line, no comment."""
    return private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def load_identity(identity: bytes) -> ec.EllipticCurvePublicKey:
    """The ECDSA public key of a wire identity; SecAggError if it is not one on a NIST curve."""
    if not 0 < len(identity) <= MAX_IDENTITY_BYTES:
        raise SecAggError(f"an identity of {len(identity)} bytes")
    try:
        key = serialization.load_ssh_public_key(identity.strip())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise SecAggError(f"an identity that is not an OpenSSH public key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST):
        raise SecAggError("an identity that is not an ECDSA key on P-256, P-384 or P-521")
    return key


def fingerprint(identity: bytes) -> str:
    """``SHA256:…`` of the OpenSSH key blob: what ``ssh-keygen -l`` and ``silotune pki`` print."""
    parts = identity.split()
    if len(parts) < 2:
        raise SecAggError("an identity that is not an OpenSSH public key line")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise SecAggError("an identity whose key is not base64") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def sign(private_key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    return private_key.sign(message, ec.ECDSA(hashes.SHA384()))


def verify(identity: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is the identity's ECDSA signature of ``message``."""
    if not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
        return False
    try:
        load_identity(identity).verify(signature, message, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, SecAggError):
        return False
    return True


def advertisement_message(session_digest: bytes, index: int, mask: bytes, encryption: bytes) -> bytes:
    """What an organization signs at stage 1: this session, its index in it, its two public keys."""
    return ADVERTISE_TAG + session_digest + struct.pack("<I", index) + mask + encryption


def consistency_message(session_digest: bytes, survivors: Iterable[int], dropped: Iterable[int]) -> bytes:
    """What an organization signs before unmasking: the survivors and dropped it was told about."""
    alive, gone = sorted(survivors), sorted(dropped)
    return (CONSISTENCY_TAG + session_digest + struct.pack("<II", len(alive), len(gone))
            + struct.pack(f"<{len(alive)}I", *alive) + struct.pack(f"<{len(gone)}I", *gone))


@dataclass(frozen=True)
class TrustedPeers:
    """The roster an organization pins: the fingerprints of the peers whose keys it accepts."""

    fingerprints: frozenset[str]
    names: dict[str, str] = field(default_factory=dict, compare=False)   # fingerprint -> name, for messages
    source: str = ""

    @classmethod
    def parse(cls, text: str, source: str = "trusted peers") -> "TrustedPeers":
        found: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            words = line.split()
            if words[0].startswith("SHA256:"):
                if len(words[0]) != len("SHA256:") + 43:
                    raise SecAggError(f"{source}, line {number}: {words[0]!r} is not a SHA256 key fingerprint")
                found[words[0]] = " ".join(words[1:]) or words[0]
                continue
            try:
                load_identity(" ".join(words[:2]).encode())
            except SecAggError as err:
                raise SecAggError(f"{source}, line {number}: not an ECDSA public key nor a SHA256: fingerprint "
                                  f"({err})") from None
            name = " ".join(words[2:]).removeprefix("silotune-org:")
            found[fingerprint(" ".join(words[:2]).encode())] = name or words[1][:16]
        if not found:
            raise SecAggError(f"{source} names no peer: pin at least the other organizations' public keys")
        return cls(frozenset(found), found, source)

    def __contains__(self, identity: object) -> bool:
        if not isinstance(identity, bytes) or not identity:
            return False
        try:
            return fingerprint(identity) in self.fingerprints
        except SecAggError:
            return False

    def __len__(self) -> int:
        return len(self.fingerprints)

    def name_of(self, identity: bytes) -> str:
        try:
            fp = fingerprint(identity)
        except SecAggError:
            return "an unreadable key"
        return self.names.get(fp, fp)
