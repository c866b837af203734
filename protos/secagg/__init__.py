"""Secure aggregation: the coordinator learns the sum of the organizations'
updates, never one of them (Bonawitz et al. 2017, with a cryptographic PRG).

What both sides share lives here; the coordinator's side is
``server/secure_aggregation/`` (its docstring maps the whole protocol), the
organization's ``clients/secure_aggregation.py``.

* ``ring``     — fixed-point quantization into Z_{2^k}, k sized so N inputs cannot wrap
* ``prg``      — AES-128/256-CTR / ChaCha20 keystream → uniform ring elements; masks applied in place
* ``keys``     — X25519 agreement, HKDF-SHA256 derivations, ChaCha20-Poly1305 sealing of shares
* ``shamir``   — t-of-n sharing of 32-byte secrets over GF(2^521 − 1)
* ``session``  — the public parameters of one session (participants, threshold, ring, P, PRG)
* ``messages`` — what the parties send each other; mask signs and seed commitments
* ``client``   — an organization's four stages (advertise, share keys, mask, unmask)
* ``layout``   — an adapter as one flat vector and back
* ``wire``     — the four exchanges' messages and record names as Flower records (both sides use only these)

Threat model: an honest-but-curious coordinator and honest organizations
that may drop out at any stage (up to N − t after masking). Not covered: a
coordinator that lies about who dropped to *different* organizations
(Bonawitz's active-security variant adds signatures and a consistency round),
and a malicious organization that sends an out-of-range input: the
coordinator cannot see inputs, so the norm bound and finiteness checks of
plain aggregation do not apply to masked updates; clipping is the
organizations' own.
"""

from protos.secagg.client import MaskingClient
from protos.secagg.errors import SecAggError, ThresholdError
from protos.secagg.messages import PublicKeys, SealedShares, UnmaskShares
from protos.secagg.ring import RingSpec
from protos.secagg.session import Session

__all__ = [
    "MaskingClient", "PublicKeys", "RingSpec", "SealedShares", "SecAggError", "Session",
    "ThresholdError", "UnmaskShares",
]
