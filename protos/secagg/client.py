"""An organization's side of one secure-aggregation session.

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving
Machine Learning"), with its active-adversary additions when the organization
has a node key and pins a roster of its peers' keys (``identity``):

1. ``advertise`` — two fresh X25519 public keys (mask, encryption), signed with
   the organization's node key (with the session's digest and its index) when
   it has one;
2. ``share_keys(roster, trusted)`` — with everyone's keys (U1): under a pinned
   roster (``trusted``) every other member's keys must be signed by a distinct
   key of that roster, else SessionRefused; then a fresh self-mask seed
   b; Shamir shares of b and of the mask private key for every member of U1,
   each sealed for its holder (ChaCha20-Poly1305 under the pair's HKDF key);
   plus a commitment SHA-256(session ‖ b) so a reconstruction can be checked,
   and a commitment to every share it dealt (``messages.share_commitment``) so
   a share revealed at unmask can be checked and a bad one attributed;
3. ``mask(shares for me, update, weight, commitments)`` — each share received
   must match its dealer's published commitment (else the dealer is named and
   this organization stops: it would be blamed for the dealer's lie); the senders of those shares and
   this organization form U2; the update is quantized (``ring.RingSpec``) and
   masked: y = q + PRG(b) + Σ_{j∈U2, j≠i} ±PRG(s_ij), + for i < j and − for
   i > j, so the pairwise masks cancel in the sum over U2;
4. ``consistency(survivors, dropped)`` — signed sessions only: this
   organization signs the survivor and dropped sets it is shown, once;
5. ``unmask(survivors, dropped, signatures)`` — the organizations whose masked input
   arrived (U3) and the rest of U2 (the very sets it signed, if it signed; under
   a pinned roster, at least t signatures of roster members on them, so no two
   honest organizations are shown different sets): this organization returns the shares of
   b for every survivor and of the mask private key for every dropped one,
   never both for the same organization, so an input that arrives late (its
   sender declared dropped) stays hidden behind its self-mask; if asked, also
   the sum of its own masks shared with the dropped ones (a "correction"),
   which spares the coordinator d·(N−d) mask expansions.

Each stage runs once, in order (4 may be skipped in an unsigned session);
anything inconsistent raises SecAggError.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from cryptography.hazmat.primitives.asymmetric import ec

from protos.secagg import identity, keys, shamir
from protos.secagg.errors import SecAggError, SessionRefused, ThresholdError
from protos.secagg.identity import TrustedPeers
from protos.secagg.messages import (KEY_SHARE, SEED_SHARE, PublicKeys, SealedShares, UnmaskShares, pairwise_sign,
                                    seed_commitment, share_commitment)
from protos.secagg.prg import apply_masks
from protos.secagg.session import Session

#: values quantized at a time (float64 temporaries of this many elements)
QUANTIZE_CHUNK = 1 << 20


class MaskingClient:
    """One organization in one session; see the module docstring for the stages."""

    def __init__(self, session: Session, index: int, signer: ec.EllipticCurvePrivateKey | None = None) -> None:
        """``signer``: the organization's node key, to sign its advertisement (not kept)."""
        session.validate()
        if index not in session.participants:
            raise SecAggError(f"index {index} is not a participant of this session")
        self.session = session
        self.index = index
        self._mask_private, mask_public = keys.generate()
        self._encryption_private, encryption_public = keys.generate()
        own, signature = b"", b""
        if signer is not None:
            own = identity.identity_of(signer)
            signature = identity.sign(signer, identity.advertisement_message(
                session.digest(), index, mask_public, encryption_public))
        self.public_keys = PublicKeys(mask_public, encryption_public, own, signature)
        self._stage = 1
        self._roster: dict[int, PublicKeys] = {}
        self._seed = b""
        self._held: dict[int, tuple[bytes, bytes]] = {}   # owner -> (seed share, mask-key share) held here
        self._u2: frozenset[int] = frozenset()
        self._signed_sets: tuple[list[int], list[int]] | None = None   # (survivors, dropped) signed at stage 4

    def _enter(self, stage: int, name: str, *also: int) -> None:
        if self._stage != stage and self._stage not in also:
            raise SecAggError(f"{name}: this organization is at stage {self._stage} of the protocol, not {stage}")
        self._stage = stage + 1

    # ---- persistence between messages ---------------------------------------
    def export_state(self) -> dict[str, bytes | int | str | list]:
        """Everything this organization must keep between stages, as flat values
        (a Flower ConfigRecord in the node's own context.state: a ClientApp process
        may not outlive one message). It holds private keys: it never leaves the node."""
        held = sorted(self._held)
        return {
            "session": self.session.to_json(),
            "index": self.index,
            "stage": self._stage,
            "mask_private": self._mask_private,
            "encryption_private": self._encryption_private,
            "mask_public": self.public_keys.mask,
            "encryption_public": self.public_keys.encryption,
            "identity": self.public_keys.identity,
            "signature": self.public_keys.signature,
            "roster": sorted(self._roster),
            "roster_mask": [self._roster[i].mask for i in sorted(self._roster)],
            "roster_encryption": [self._roster[i].encryption for i in sorted(self._roster)],
            "roster_identity": [self._roster[i].identity for i in sorted(self._roster)],
            "seed": self._seed,
            "held": held,
            "held_seed": [self._held[i][0] for i in held],
            "held_key": [self._held[i][1] for i in held],
            "u2": sorted(self._u2),
            "signed": int(self._signed_sets is not None),
            "signed_survivors": self._signed_sets[0] if self._signed_sets else [],
            "signed_dropped": self._signed_sets[1] if self._signed_sets else [],
        }

    @classmethod
    def restore(cls, values: Mapping[str, object]) -> "MaskingClient":
        try:
            client = cls.__new__(cls)
            client.session = Session.from_json(str(values["session"]))
            client.index = int(values["index"])  # type: ignore[arg-type]
            client._stage = int(values["stage"])  # type: ignore[arg-type]
            client._mask_private = bytes(values["mask_private"])  # type: ignore[arg-type]
            client._encryption_private = bytes(values["encryption_private"])  # type: ignore[arg-type]
            client.public_keys = PublicKeys(bytes(values["mask_public"]),  # type: ignore[arg-type]
                                            bytes(values["encryption_public"]),  # type: ignore[arg-type]
                                            bytes(values["identity"]), bytes(values["signature"]))  # type: ignore[arg-type]
            client._roster = {int(i): PublicKeys(bytes(m), bytes(e), bytes(d)) for i, m, e, d in zip(
                values["roster"], values["roster_mask"], values["roster_encryption"],  # type: ignore[call-overload]
                values["roster_identity"], strict=True)}
            client._seed = bytes(values["seed"])  # type: ignore[arg-type]
            client._held = {int(i): (bytes(a), bytes(b)) for i, a, b in zip(
                values["held"], values["held_seed"], values["held_key"], strict=True)}  # type: ignore[call-overload]
            client._u2 = frozenset(int(i) for i in values["u2"])  # type: ignore[union-attr]
            client._signed_sets = ([int(i) for i in values["signed_survivors"]],  # type: ignore[union-attr]
                                   [int(i) for i in values["signed_dropped"]]) if values["signed"] else None  # type: ignore[union-attr]
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, SecAggError):
                raise
            raise SecAggError(f"saved secure-aggregation state does not parse: {err}") from None
        return client

    @property
    def stage(self) -> int:
        """The next stage this organization expects (1..5; 6 once done; 4 is skipped in unsigned sessions)."""
        return self._stage

    # ---- 1 -----------------------------------------------------------------
    def advertise(self) -> PublicKeys:
        self._enter(1, "advertise")
        return self.public_keys

    # ---- 2 -----------------------------------------------------------------
    def share_keys(self, roster: Mapping[int, PublicKeys], trusted: TrustedPeers | None = None) -> SealedShares:
        """``trusted``: the roster this organization pinned; then every other member must be
        signed by a distinct key of it (SessionRefused names the first that is not)."""
        self._enter(2, "share_keys")
        t = self.session.threshold
        if not set(roster) <= set(self.session.participants):
            raise SecAggError("the roster names organizations outside the session")
        own = roster.get(self.index)
        if own is None or not own.same_keys(self.public_keys) or own.identity != self.public_keys.identity:
            raise SecAggError("the roster does not hold this organization's own keys")
        if len(roster) < t:
            raise ThresholdError(f"{len(roster)} organization(s) advertised keys, the threshold is {t}")
        all_keys = [k for pk in roster.values() for k in (pk.mask, pk.encryption)]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggError("two advertised public keys are identical")
        if trusted is not None:
            self._verify_roster(roster, trusted)
        self._roster = dict(roster)
        self._seed = os.urandom(shamir.SECRET_BYTES)
        members = sorted(roster)
        seed_shares = shamir.split(self._seed, t, members)
        key_shares = shamir.split(self._mask_private, t, members)
        sealed: dict[int, bytes] = {}
        sid = self.session.session_id
        for j in members:
            if j == self.index:
                self._held[j] = (seed_shares[j], key_shares[j])
                continue
            key = keys.pair_key(self._encryption_private, roster[j].encryption, sid, keys.SHARE_ENCRYPTION,
                                self.index, j)
            sealed[j] = keys.seal(key, seed_shares[j] + key_shares[j], sid, self.index, j)
        commitments = {j: (share_commitment(sid, self.index, j, SEED_SHARE, seed_shares[j]),
                           share_commitment(sid, self.index, j, KEY_SHARE, key_shares[j])) for j in members}
        return SealedShares(sealed, seed_commitment(sid, self._seed), commitments)

    def _verify_roster(self, roster: Mapping[int, PublicKeys], trusted: TrustedPeers) -> None:
        """Every other member's keys signed, for this session and its index, by a key of the
        pinned roster, one key per member: the coordinator cannot add parties of its own."""
        digest = self.session.digest()
        seen: dict[bytes, int] = {self.public_keys.identity: self.index} if self.public_keys.identity else {}
        for j in sorted(roster):
            if j == self.index:
                continue
            pk = roster[j]
            if not pk.signed:
                raise SessionRefused(f"the keys of index {j} are not signed, and this organization pins its "
                                     f"peers ({trusted.source}): a party the coordinator runs could hide there")
            if pk.identity not in trusted:
                raise SessionRefused(f"the keys of index {j} are signed by {identity.fingerprint(pk.identity)}, "
                                     f"which is not in this organization's trusted peers ({trusted.source})")
            if pk.identity in seen:
                raise SessionRefused(f"{trusted.name_of(pk.identity)} signs both index {seen[pk.identity]} and "
                                     f"index {j}: one organization counted twice")
            message = identity.advertisement_message(digest, j, pk.mask, pk.encryption)
            if not identity.verify(pk.identity, pk.signature, message):
                raise SessionRefused(f"the keys of index {j} are not signed by the key of "
                                     f"{trusted.name_of(pk.identity)} they name (forged, or another session)")
            seen[pk.identity] = j

    # ---- 3 -----------------------------------------------------------------
    def mask(self, sealed_for_me: Mapping[int, bytes], update: np.ndarray, weight: int,
             commitments: Mapping[int, tuple[bytes, bytes]] | None = None) -> np.ndarray:
        """The masked ring vector of ``update`` (flat, P values) weighted by ``weight``.

        ``commitments``: per source, its published commitments to the two shares it dealt
        here; each share must match (else SecAggError names the source: revealed at unmask,
        a share that does not match would be blamed on this organization)."""
        self._enter(3, "mask")
        session, ring, sid = self.session, self.session.ring, self.session.session_id
        if not set(sealed_for_me) <= set(self._roster) - {self.index}:
            raise SecAggError("shares arrived from organizations outside the roster")
        if len(sealed_for_me) + 1 < session.threshold:
            raise ThresholdError(f"{len(sealed_for_me) + 1} organization(s) shared keys, "
                                 f"the threshold is {session.threshold}")
        update = np.asarray(update).reshape(-1)
        if update.size != session.length:
            raise SecAggError(f"update of {update.size} values, the session expects {session.length}")
        size = shamir.SHARE_BYTES
        for src, sealed in sealed_for_me.items():
            key = keys.pair_key(self._encryption_private, self._roster[src].encryption, sid,
                                keys.SHARE_ENCRYPTION, src, self.index)
            plain = keys.open_sealed(key, sealed, sid, src, self.index)
            if len(plain) != 2 * size:
                raise SecAggError(f"shares from {src} have {len(plain)} bytes, expected {2 * size}")
            if commitments is not None:
                expected = (share_commitment(sid, src, self.index, SEED_SHARE, plain[:size]),
                            share_commitment(sid, src, self.index, KEY_SHARE, plain[size:]))
                if commitments.get(src) != expected:
                    raise SecAggError(f"the shares {src} dealt to this organization do not match the commitments "
                                      f"{src} published: {src} dealt inconsistently (or the coordinator altered them)")
            self._held[src] = (plain[:size], plain[size:])
        self._u2 = frozenset(sealed_for_me) | {self.index}

        vector = np.empty(session.vector_length, dtype=ring.dtype)
        for start in range(0, session.length, QUANTIZE_CHUNK):
            stop = min(start + QUANTIZE_CHUNK, session.length)
            ring.quantize(update[start:stop], weight, out=vector[start:stop])
        vector[-1] = ring.encode_weight(weight)
        masks = [(keys.self_mask_seed(self._seed, sid, self.index), 1)]
        for j in sorted(self._u2 - {self.index}):
            seed = keys.pair_key(self._mask_private, self._roster[j].mask, sid, keys.MASK, self.index, j)
            masks.append((seed, pairwise_sign(self.index, j)))
        apply_masks(vector, masks, ring.ring_bits, session.prg)
        return vector

    # ---- 4 -----------------------------------------------------------------
    def consistency(self, survivors: list[int], dropped: list[int],
                    signer: ec.EllipticCurvePrivateKey | None = None) -> bytes:
        """This organization's signature of the survivor and dropped sets it is shown (b"" without
        a node key). Once per session: an honest organization vouches for one pair of sets only."""
        self._enter(4, "consistency")
        self._check_sets(set(survivors), set(dropped))
        self._signed_sets = (sorted(survivors), sorted(dropped))
        if signer is None:
            return b""
        if identity.identity_of(signer) != self.public_keys.identity:
            raise SecAggError("the consistency signature must come from the key that signed the advertisement")
        return identity.sign(signer, identity.consistency_message(self.session.digest(), survivors, dropped))

    def _check_sets(self, alive: set[int], gone: set[int]) -> None:
        if alive & gone:
            raise SecAggError(f"organizations {sorted(alive & gone)[:5]} are listed both as survivors and as "
                              "dropped: revealing both of their secrets would unmask their input")
        if alive | gone != self._u2:
            raise SecAggError("survivors and dropped organizations do not make up the organizations that "
                              "shared keys with this one")
        if self.index not in alive:
            raise SecAggError("this organization is listed as dropped")
        if len(alive) < self.session.threshold:
            raise ThresholdError(f"{len(alive)} masked input(s) arrived, the threshold is "
                                 f"{self.session.threshold}: refusing to reveal shares")

    # ---- 5 -----------------------------------------------------------------
    def unmask(self, survivors: list[int], dropped: list[int], correction: bool = False,
               signatures: Mapping[int, bytes] | None = None, trusted: TrustedPeers | None = None) -> UnmaskShares:
        """The shares that remove the survivors' self-masks and the dropped ones' pairwise masks.

        ``correction``: also the sum of this organization's pairwise masks with the dropped
        ones (d streams here instead of d·(N−d) at the coordinator). It reveals nothing the
        dropped organizations' mask keys, which the shares reconstruct anyway, do not.

        After ``consistency``, the sets must be the ones signed. ``trusted`` (a pinned roster):
        ``signatures`` must hold at least t valid signatures of distinct survivors on exactly
        these sets — with t > (N + c)/2, no two honest organizations can then have been
        shown different sets, whatever c members collude with the coordinator."""
        self._enter(5, "unmask", 4)
        alive, gone = set(survivors), set(dropped)
        self._check_sets(alive, gone)
        if self._signed_sets is not None and self._signed_sets != (sorted(alive), sorted(gone)):
            raise SecAggError("the unmask request names other survivors or dropped organizations than the ones "
                              "this organization signed: refusing to reveal shares")
        if trusted is not None:
            self._verify_consistency(sorted(alive), sorted(gone), signatures or {}, trusted)
        fix = None
        if correction and gone:
            session, sid = self.session, self.session.session_id
            fix = np.zeros(session.vector_length, dtype=session.ring.dtype)
            apply_masks(fix, [(keys.pair_key(self._mask_private, self._roster[u].mask, sid, keys.MASK, self.index, u),
                               pairwise_sign(self.index, u)) for u in sorted(gone)], session.ring.ring_bits, session.prg)
        return UnmaskShares(
            seed={i: self._held[i][0] for i in sorted(alive)},
            mask_key={j: self._held[j][1] for j in sorted(gone)},
            correction=fix,
        )

    def _verify_consistency(self, alive: list[int], gone: list[int], signatures: Mapping[int, bytes],
                            trusted: TrustedPeers) -> None:
        if self._signed_sets is None:
            raise SessionRefused("this organization pins its peers, and the coordinator skipped the consistency "
                                 "round: without it, different organizations could be shown different survivors")
        message = identity.consistency_message(self.session.digest(), alive, gone)
        valid = sorted(i for i, signature in signatures.items()
                       if i in alive and i in self._roster and self._roster[i].signed
                       and (i == self.index or self._roster[i].identity in trusted)
                       and identity.verify(self._roster[i].identity, signature, message))
        if len(valid) < self.session.threshold:
            raise SessionRefused(f"{len(valid)} valid signature(s) of survivors on the survivor set, the threshold "
                                 f"is {self.session.threshold}: refusing to reveal shares")
