"""Secure aggregation: the coordinator learns the sum of the organizations'
updates, never one of them (Bonawitz et al. 2017, with a cryptographic PRG).

What both sides share lives here; the coordinator's side is
``server/secure_aggregation/`` (its docstring maps the whole protocol), the
organization's ``clients/secure_aggregation.py``.

* ``ring``     — fixed-point quantization into Z_{2^k}, k sized so N inputs cannot wrap
* ``prg``      — AES-128/256-CTR / ChaCha20 keystream → uniform ring elements; masks applied in place
* ``keys``     — X25519 agreement, HKDF-SHA256 derivations, ChaCha20-Poly1305 sealing of shares
* ``shamir``   — t-of-n sharing of 32-byte secrets over GF(2^521 − 1)
* ``session``  — the public parameters of one session (participants, threshold, ring, P, PRG), its
  digest (what signatures bind to) and an organization's floor (``Session.check_floor``)
* ``identity`` — node-key signatures of advertised keys and survivor sets; the roster of trusted peers
* ``messages`` — what the parties send each other; mask signs, seed and share commitments
* ``client``   — an organization's stages (advertise, share keys, mask, consistency, unmask)
* ``layout``   — an adapter as one flat vector and back
* ``wire``     — the exchanges' messages and record names as Flower records, versioned (both sides use only these)

Threat model: organizations that may drop out at any stage (up to N − t after
masking), some of which may be malicious, and a coordinator that may be
malicious too — with what that needs from each organization: a session floor
(its policy), its node key, and a roster of its peers' keys that it pins. What
is defended, how, and what is not (out-of-range inputs, collusion beyond
2t − N − 1 participants, a coordinator without a pinned roster, repeated
sessions over one global): server/secure_aggregation/__init__.py, "Secure
aggregation: what it defends".
"""

from protos.secagg.client import MaskingClient
from protos.secagg.errors import SecAggError, SessionRefused, ThresholdError
from protos.secagg.identity import TrustedPeers
from protos.secagg.messages import PublicKeys, SealedShares, UnmaskShares
from protos.secagg.ring import RingSpec
from protos.secagg.session import Session

__all__ = [
    "MaskingClient", "PublicKeys", "RingSpec", "SealedShares", "SecAggError", "Session", "SessionRefused",
    "ThresholdError", "TrustedPeers", "UnmaskShares",
]
