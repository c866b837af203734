"""The coordinator's protocol state machine for one secure-aggregation
session: route keys and shares, sum the masked inputs as they arrive, unmask
the sum. It knows nothing of Flower: round.py feeds it the parsed replies.

Stages (each closed by the call that starts the next; see
protos/secagg/client.py for the organizations' side):

1. ``add_keys`` per organization (a signed advertisement must verify under
   the key it names, one key per index) → ``roster()``: U1, broadcast to U1;
2. ``add_shares`` per organization (with a commitment to every share it
   dealt) → ``routing()``: U2 (those that sent shares); each member of U2 gets
   the sealed shares addressed to it and ``commitments_for`` them;
3. ``add_masked`` per organization: the masked ring vector is added to a
   running sum mod 2^k and dropped (memory O(P) whatever N) →
   ``unmask_request()``: survivors U3 and dropped U2 \\ U3;
4. signed sessions (``signed``): ``add_consistency`` per survivor, its
   signature of (U3, dropped) → ``consistency_signatures()``: the signers,
   at least t, the only ones asked to unmask;
5. ``add_unmask`` per survivor (with its correction, when asked: the sum of
   its masks shared with the dropped, subtracted at once). Every share is
   checked against the commitment its dealer published at stage 2: a reply
   with one that does not match is refused whole, naming who revealed it and
   whose share it was, and the session goes on without it → ``finish()``:
   from any t accepted responders, reconstruct every survivor's self-mask seed and
   every dropped organization's mask private key, subtract the survivors'
   self-masks and the pairwise masks that survivors without a correction
   share with dropped organizations, all in one chunked pass over the sum,
   and dequantize: the weighted mean.

Every reconstruction is also checked (a mask key against its advertised public
key, a seed against its commitment): verified shares that do not rebuild the
dealer's secret mean the dealer dealt an inconsistent sharing, and it is
named. The unmasked sum must be one that honest inputs can make (weight sum in
[survivors, survivors·W], every value within the weight sum's share of the
clip): anything else means someone masked values outside its slot, which no
one can be named for. Fewer than t organizations at stage 3, 4 or 5 →
ThresholdError.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protos.secagg import identity, keys, shamir
from protos.secagg.errors import SecAggError, ThresholdError
from protos.secagg.messages import (KEY_SHARE, SEED_SHARE, PublicKeys, SealedShares, UnmaskShares, pairwise_sign,
                                    seed_commitment, share_commitment)
from protos.secagg.prg import apply_masks
from protos.secagg.session import Session

log = logging.getLogger("silotune.server")

#: values dequantized at a time (int64/float64 temporaries of this many elements)
DEQUANTIZE_CHUNK = 1 << 20


@dataclass
class SecAggResult:
    mean: np.ndarray             # float32, P values: Σ nᵢ·clip(xᵢ) / Σ nᵢ within the quantization error
    weight_sum: int              # Σ nᵢ over the survivors
    survivors: list[int]         # U3
    dropped: list[int]           # U2 \ U3: masked but never arrived
    error_bound: float           # the largest |mean − exact weighted mean of the clipped inputs|
    timings: dict[str, float] = field(default_factory=dict)


class SecAggCoordinator:
    """One session at the coordinator."""

    def __init__(self, session: Session, survivor_corrections: bool = True,
                 name: Callable[[int], str] = str) -> None:
        """``survivor_corrections``: after dropouts, ask each survivor for the sum of its
        masks with the dropped (P values more from each survivor, d·(N−d) mask expansions
        less here); a survivor that does not send it is corrected here from the shares.
        ``name``: how errors that blame an organization name it (from its index)."""
        session.validate()
        self._name = name
        self.session = session
        self._digest = session.digest()   # what the organizations' signatures bind to
        self.survivor_corrections = survivor_corrections
        self._corrected: set[int] = set()
        self._stage = 1
        self._keys: dict[int, PublicKeys] = {}
        self._sealed: dict[int, dict[int, bytes]] = {}     # src -> dst -> sealed
        self._commitments: dict[int, bytes] = {}
        self._share_commitments: dict[int, dict[int, tuple[bytes, bytes]]] = {}   # dealer -> holder -> (seed, key)
        self._sum: np.ndarray | None = None
        self._u2: list[int] = []
        self._u3: list[int] = []
        self._dropped: list[int] = []
        self._consistency: dict[int, bytes] = {}
        self._signers: set[int] | None = None    # signed sessions: who may unmask (after stage 4)
        self._unmask: dict[int, UnmaskShares] = {}

    def _at(self, stage: int, what: str) -> None:
        if self._stage != stage:
            raise SecAggError(f"{what}: the session is at stage {self._stage}, not {stage}")

    # ---- 1 -----------------------------------------------------------------
    def add_keys(self, index: int, public: PublicKeys) -> None:
        self._at(1, "add_keys")
        if index not in self.session.participants:
            raise SecAggError(f"keys from {index}, not a participant")
        if index in self._keys:
            raise SecAggError(f"{index} advertised keys twice")
        if len(public.mask) != keys.KEY_BYTES or len(public.encryption) != keys.KEY_BYTES:
            raise SecAggError(f"{index}: public keys must be {keys.KEY_BYTES} bytes")
        if public.signed:
            message = identity.advertisement_message(self._digest, index, public.mask, public.encryption)
            if not identity.verify(public.identity, public.signature, message):
                raise SecAggError(f"the keys of {index} are not signed by the node key they name")
            if any(other.identity == public.identity for other in self._keys.values()):
                raise SecAggError(f"{index} signs with the node key of another participant "
                                  f"({identity.fingerprint(public.identity)}): one organization counted twice")
        elif public.signature:
            raise SecAggError(f"{index} sent a signature without the node key it was made with")
        self._keys[index] = public

    @property
    def signed(self) -> bool:
        """Whether the roster's keys are signed (some are: a mixed roster is the organizations' to refuse);
        signed sessions have the consistency stage."""
        return any(public.signed for public in self._keys.values())

    def roster(self) -> dict[int, PublicKeys]:
        """U1's keys, to broadcast; closes stage 1."""
        self._at(1, "roster")
        self._need(len(self._keys), "organization(s) advertised keys")
        everyone = [k for pk in self._keys.values() for k in (pk.mask, pk.encryption)]
        if len(set(everyone)) != len(everyone):
            raise SecAggError("two organizations advertised the same public key")
        self._stage = 2
        return dict(sorted(self._keys.items()))

    # ---- 2 -----------------------------------------------------------------
    def add_shares(self, src: int, shares: SealedShares) -> None:
        self._at(2, "add_shares")
        if src not in self._keys:
            raise SecAggError(f"shares from {src}, not in the roster")
        if src in self._sealed:
            raise SecAggError(f"{src} sent shares twice")
        if set(shares.sealed) != set(self._keys) - {src}:
            raise SecAggError(f"{src} did not send one share to every other member of the roster")
        if len(shares.seed_commitment) != 32:
            raise SecAggError(f"{src}: seed commitment must be 32 bytes")
        if set(shares.share_commitments) != set(self._keys) or any(
                len(c) != 32 for pair in shares.share_commitments.values() for c in pair):
            raise SecAggError(f"{src} did not commit to one share of each kind for every member of the roster")
        self._sealed[src] = dict(shares.sealed)
        self._commitments[src] = shares.seed_commitment
        self._share_commitments[src] = dict(shares.share_commitments)

    def routing(self) -> dict[int, dict[int, bytes]]:
        """For each member of U2, the sealed shares addressed to it by the rest of U2; closes stage 2."""
        self._at(2, "routing")
        self._need(len(self._sealed), "organization(s) shared keys")
        u2 = sorted(self._sealed)
        routed = {dst: {src: self._sealed[src][dst] for src in u2 if src != dst} for dst in u2}
        self._sealed.clear()
        self._sum = np.zeros(self.session.vector_length, dtype=self.session.ring.dtype)
        self._u2 = u2
        self._stage = 3
        return routed

    def commitments_for(self, dst: int) -> dict[int, tuple[bytes, bytes]]:
        """Per other member of U2, its commitments to the shares it sealed for ``dst`` (after routing)."""
        return {src: self._share_commitments[src][dst] for src in self._u2 if src != dst}

    # ---- 3 -----------------------------------------------------------------
    def add_masked(self, index: int, vector: np.ndarray) -> None:
        """Fold one masked input into the running sum; the input is not kept."""
        self._at(3, "add_masked")
        assert self._sum is not None
        if index not in self._commitments:
            raise SecAggError(f"masked input from {index}, which did not share keys")
        if index in self._u3:
            raise SecAggError(f"{index} sent a second masked input")
        self._check_vector(index, vector, "masked input")
        np.add(self._sum, vector, out=self._sum)
        self._u3.append(index)

    def _check_vector(self, index: int, vector: np.ndarray, what: str) -> None:
        ring, shape = self.session.ring, (self.session.vector_length,)
        if vector.dtype != ring.dtype or vector.shape != shape:
            raise SecAggError(f"{what} from {index} is {vector.dtype} {vector.shape}, expected {ring.dtype} {shape}")
        if ring.ring_bits < ring.dtype.itemsize * 8 and int(vector.max()) > ring.modulus_mask:
            raise SecAggError(f"{what} from {index} holds values outside Z_2^{ring.ring_bits}")

    def unmask_request(self) -> tuple[list[int], list[int]]:
        """(survivors U3, dropped U2 \\ U3), to send to every survivor; closes stage 3."""
        self._at(3, "unmask_request")
        self._need(len(self._u3), "masked input(s) arrived")
        self._stage = 4
        survivors = sorted(self._u3)
        self._dropped = sorted(set(self._u2) - set(survivors))
        return survivors, list(self._dropped)

    @property
    def asks_corrections(self) -> bool:
        """Whether the unmask request asks survivors for their corrections (after unmask_request)."""
        return self.survivor_corrections and bool(self._dropped)

    # ---- 4 (signed sessions) -------------------------------------------------
    def add_consistency(self, index: int, signature: bytes) -> None:
        """A survivor's signature of (U3, dropped), checked against its advertised node key."""
        self._at(4, "add_consistency")
        if self._signers is not None or self._unmask:
            raise SecAggError("the consistency stage is closed")
        if index not in self._u3:
            raise SecAggError(f"a consistency signature from {index}, not a survivor")
        if index in self._consistency:
            raise SecAggError(f"{index} signed the survivors twice")
        public = self._keys[index]
        if public.signed:
            message = identity.consistency_message(self._digest, self._u3, self._dropped)
            if not identity.verify(public.identity, signature, message):
                raise SecAggError(f"{index}'s signature of the survivors does not verify under its node key")
        elif signature:
            raise SecAggError(f"{index} signed the survivors without a node key")
        self._consistency[index] = signature

    def consistency_signatures(self) -> dict[int, bytes]:
        """The signers (at least t) and their signatures, for the unmask request; closes stage 4:
        from here on only signers may unmask."""
        self._at(4, "consistency_signatures")
        self._need(len(self._consistency), "survivor(s) signed the survivor set")
        self._signers = set(self._consistency)
        return dict(sorted(self._consistency.items()))

    # ---- 5 -----------------------------------------------------------------
    def add_unmask(self, index: int, shares: UnmaskShares) -> None:
        """One survivor's shares; SecAggError (and nothing of the reply is used) if one of
        them is not the share its dealer committed to for this holder."""
        self._at(4, "add_unmask")
        if index not in self._u3:
            raise SecAggError(f"unmask shares from {index}, not a survivor")
        if self._signers is not None and index not in self._signers:
            raise SecAggError(f"unmask shares from {index}, which did not sign the survivor set")
        if index in self._unmask:
            raise SecAggError(f"{index} sent unmask shares twice")
        if set(shares.seed) != set(self._u3) or set(shares.mask_key) != set(self._dropped):
            raise SecAggError(f"{index} did not answer the unmask request it was sent")
        self._verify_shares(index, shares)
        if shares.correction is not None:
            if not self.asks_corrections:
                raise SecAggError(f"{index} sent a correction that was not asked for")
            self._check_vector(index, shares.correction, "correction")
            assert self._sum is not None
            np.subtract(self._sum, shares.correction, out=self._sum)   # its masks with the dropped, removed
            self._corrected.add(index)
        self._unmask[index] = UnmaskShares(shares.seed, shares.mask_key)   # the vector is not kept

    def _verify_shares(self, holder: int, shares: UnmaskShares) -> None:
        sid = self.session.session_id
        for kind, what, revealed in ((SEED_SHARE, "self-mask seed", shares.seed),
                                     (KEY_SHARE, "mask key", shares.mask_key)):
            for dealer, share in sorted(revealed.items()):
                if share_commitment(sid, dealer, holder, kind, share) != self._share_commitments[dealer][holder][kind]:
                    who, whose = self._name(holder), self._name(dealer)
                    raise SecAggError(
                        f"{who} revealed a share of {whose}'s {what} that is not the one {whose} committed to "
                        f"dealing it: {who}'s unmask shares are not used")

    def finish(self) -> SecAggResult:
        """Unmask and dequantize the sum; closes the session."""
        self._at(4, "finish")
        started = time.perf_counter()
        self._need(len(self._unmask), "organization(s) sent unmask shares that verify")
        self._stage = 5
        session, ring, sid = self.session, self.session.ring, self.session.session_id
        total, survivors, dropped = self._sum, sorted(self._u3), list(self._dropped)
        assert total is not None
        self._sum = None
        reconstruct = shamir.Reconstructor(sorted(self._unmask), session.threshold)
        masks: list[tuple[bytes, int]] = []
        for i in survivors:
            seed = reconstruct.combine({h: s.seed[i] for h, s in self._unmask.items()})
            if seed_commitment(sid, seed) != self._commitments[i]:
                raise SecAggError(f"the verified shares of {self._name(i)}'s self-mask seed do not rebuild the seed "
                                  f"it committed to: {self._name(i)} dealt an inconsistent sharing (inconsistent shares)")
            masks.append((keys.self_mask_seed(seed, sid, i), -1))
        for u in dropped:
            private = reconstruct.combine({h: s.mask_key[u] for h, s in self._unmask.items()})
            if X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw() != self._keys[u].mask:
                raise SecAggError(f"the verified shares of dropped {self._name(u)}'s mask key do not rebuild the key "
                                  f"it advertised: {self._name(u)} dealt an inconsistent sharing (inconsistent shares)")
            for v in survivors:
                if v in self._corrected:
                    continue   # v removed its masks with the dropped itself
                seed = keys.pair_key(private, self._keys[v].mask, sid, keys.MASK, u, v)
                masks.append((seed, -pairwise_sign(v, u)))  # v added sign(v, u)·PRG(s_uv): remove it
        reconstructed = time.perf_counter()
        apply_masks(total, masks, ring.ring_bits, session.prg)
        unmasked = time.perf_counter()
        weight_sum = ring.decode_weight(int(total[-1]))
        if not len(survivors) <= weight_sum <= len(survivors) * ring.max_weight:
            raise SecAggError(f"the unmasked weight sum is {weight_sum}, outside what {len(survivors)} inputs of "
                              f"weight 1..{ring.max_weight} make: the masks did not cancel, or an organization "
                              "masked a weight outside its slot")
        # |q_i| <= w_i/W·C·2^f + 1/2 for every honest input: the sum can be no larger (+1: float rounding)
        bound = math.ldexp(ring.clip * weight_sum / ring.max_weight, ring.frac_bits) + len(survivors) / 2 + 1
        mean = np.empty(session.length, dtype=np.float32)
        for start in range(0, session.length, DEQUANTIZE_CHUNK):
            stop = min(start + DEQUANTIZE_CHUNK, session.length)
            largest = int(np.abs(ring.to_signed(total[start:stop])).max())
            if largest > bound:
                raise SecAggError(f"the unmasked sum holds a value of {largest} steps, more than {bound:.0f}, the most "
                                  f"{len(survivors)} inputs of total weight {weight_sum} can make: an organization "
                                  "masked values outside its slot (which one cannot be told)")
            mean[start:stop] = ring.dequantize_mean(total[start:stop], weight_sum)
        del total
        log.info("secure aggregation: %d survivor(s), %d dropped, %d mask(s) removed",
                 len(survivors), len(dropped), len(masks))
        return SecAggResult(
            mean=mean, weight_sum=weight_sum, survivors=survivors, dropped=dropped,
            error_bound=ring.mean_error_bound(len(survivors), weight_sum),
            timings={"reconstruct_s": reconstructed - started, "unmask_s": unmasked - reconstructed,
                     "dequantize_s": time.perf_counter() - unmasked},
        )

    def _need(self, count: int, what: str) -> None:
        if count < self.session.threshold:
            raise ThresholdError(
                f"{count} {what}, the threshold is {self.session.threshold}: the sum cannot be unmasked "
                f"(at most N - t = {len(self.session.participants) - self.session.threshold} may drop)"
            )
