"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 − 1).

A secret s is the constant term of a random polynomial of degree t − 1; the
share of the party with index x (1 ≤ x < p) is the polynomial's value at x.
Any t shares give s back by Lagrange interpolation at 0; fewer give no
information about it. 2^521 − 1 is a Mersenne prime above every 32-byte
secret (X25519 private keys and self-mask seeds), so one polynomial carries
a whole secret and a share is 66 bytes.

``Reconstructor`` computes the Lagrange coefficients of one set of indices
once and reuses them: the coordinator reconstructs every organization's
secret from the same t share holders, O(t²) once plus O(t) per secret.
"""

from __future__ import annotations

import secrets as _random
from typing import Mapping, Sequence

from protos.secagg.errors import SecAggError, ThresholdError

PRIME = 2**521 - 1
SHARE_BYTES = 66
SECRET_BYTES = 32


def split(secret: bytes, threshold: int, indices: Sequence[int]) -> dict[int, bytes]:
    """Shares of ``secret`` for each index; any ``threshold`` of them recover it."""
    if len(secret) > SECRET_BYTES:
        raise SecAggError(f"secrets are at most {SECRET_BYTES} bytes")
    _check_indices(indices)
    if not 1 <= threshold <= len(indices):
        raise SecAggError(f"threshold {threshold} must be in 1..{len(indices)} (the number of shares)")
    coefficients = [int.from_bytes(secret, "big")] + [_random.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in indices:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (index → share)."""
    return Reconstructor(sorted(shares)[: max(threshold, 1)], threshold).combine(shares)


class Reconstructor:
    """Lagrange interpolation at 0 for a fixed set of ``threshold`` share indices."""

    def __init__(self, indices: Sequence[int], threshold: int) -> None:
        indices = sorted(set(indices))
        if len(indices) < threshold:
            raise ThresholdError(f"{len(indices)} share(s), the threshold is {threshold}")
        self.indices = indices[:threshold]
        _check_indices(self.indices)
        self.coefficients: dict[int, int] = {}
        for j in self.indices:
            numerator, denominator = 1, 1
            for m in self.indices:
                if m != j:
                    numerator = numerator * m % PRIME
                    denominator = denominator * (m - j) % PRIME
            self.coefficients[j] = numerator * pow(denominator, -1, PRIME) % PRIME

    def combine(self, shares: Mapping[int, bytes]) -> bytes:
        missing = [j for j in self.indices if j not in shares]
        if missing:
            raise ThresholdError(f"no share from index(es) {missing[:5]}: {len(shares)} share(s) for "
                                 f"a threshold of {len(self.indices)}")
        total = 0
        for j, coefficient in self.coefficients.items():
            share = shares[j]
            if len(share) != SHARE_BYTES:
                raise SecAggError(f"share {j} is {len(share)} bytes, expected {SHARE_BYTES}")
            total = (total + int.from_bytes(share, "big") * coefficient) % PRIME
        if total >= 2 ** (8 * SECRET_BYTES):
            raise SecAggError("shares are inconsistent: the reconstructed value is not a 32-byte secret")
        return total.to_bytes(SECRET_BYTES, "big")


def _check_indices(indices: Sequence[int]) -> None:
    if len(set(indices)) != len(indices) or any(not 1 <= x < PRIME for x in indices):
        raise SecAggError("share indices must be distinct and in 1..p-1")
