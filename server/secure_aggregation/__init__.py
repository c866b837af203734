"""Secure aggregation, the coordinator's side: the coordinator learns the sum
of the organizations' updates, never one of them (Bonawitz et al. 2017).

Where the code lives:

* ``protos/secagg/`` — the contract both sides share: the four exchanges'
  messages and record names (``wire``), the session's public parameters,
  ring arithmetic, PRG, keys, Shamir, and an organization's protocol steps
  (``client.MaskingClient``). Its docstring states the threat model.
* ``server/secure_aggregation/`` (this package):
  ``round.py`` — ``SecureRound``: one round attempt as four Flower exchanges
  (deadlines, admission, rejection reasons, dropouts), then the strategy;
  ``coordinator.py`` — ``SecAggCoordinator``: the protocol state machine
  (route keys and shares, running sum, unmask), no Flower in it.
* ``clients/secure_aggregation.py`` — the organization's side: the
  ClientApp's answer to each exchange, its protocol state kept in its own
  ``context.state`` between messages.

The stages of a round (each a TRAIN message to every organization still
in, carrying ``wire.SECAGG_RECORD``, protocol version 2; each closed by a deadline):

1. advertise — each sampled organization gets the session (its index, the
   participants, threshold t, ring, P, PRG); it refuses one below its floor,
   else answers with two public keys, signed with its node key when it has
   one; those that do form U1, the roster;
2. share keys — the roster (keys, node keys, signatures) goes to U1; an
   organization that pins its peers checks every signature first; each
   answers with Shamir shares of its mask private key and of a fresh self-mask
   seed, sealed for every other member, a commitment to the seed, and a
   commitment to every share it dealt; those that do form U2;
3. mask — each member of U2 gets the usual train instruction (encoded global,
   round config) plus the sealed shares addressed to it and their dealers'
   commitments (it checks them); it trains, masks its
   delta (update − global over the shared factors, and its weight) and answers
   with the masked ring vector, which the coordinator adds to a running sum
   and drops; those whose input arrives form U3, the survivors;
4. consistency — signed sessions only: each survivor signs (U3, dropped);
   the signers, at least t, are the ones asked to unmask;
5. unmask — the survivors (signers) learn U3, the dropped U2 \\ U3 and the
   signatures, and answer with
   shares of every survivor's seed and every dropped one's mask key (never
   both for one organization) and, after dropouts, the sum of their own masks
   shared with the dropped ones (so the coordinator expands N + (survivors
   without one)·d masks, not N + d·(N−d)); each share is checked against its
   dealer's commitment, and from any t verified replies the coordinator
   removes the masks and dequantizes.

What the coordinator learns: the example-weighted mean delta of the
survivors (under DP-FedAvg, the sum of their clipped deltas) and their total
weight; who answered each stage; every organization's public keys, node key
and commitments; each masked input's header (job, round, base model, adapter
config, tensor names and shapes: no example count, no metrics) and the
organization's name. Never one organization's update, example count or
metrics: a masked input alone is uniform in the ring.

Secure aggregation: what it defends
-----------------------------------

Parties: the coordinator, the organizations of a session (N, threshold t),
of which c collude with the coordinator (c = 0: all honest). Each organization
brings three things the coordinator cannot change: its **floor** F
(``min_secure_session`` of its policy, clients/policy.py: 3 by default, 2 for
a simulation's virtual organizations), its **node key** (the key its
SuperNode authenticates with; node config ``signing-key``) and, optionally, a
**pinned roster** of its peers' node keys (``--trusted-peers FILE``: their
ORG.pub lines or SHA256 fingerprints, exchanged out of band — not through the
coordinator; protos/secagg/identity.py).

*Attack: a session too small to hide anyone.* With N = 2 — one organization and
a participant the coordinator runs — the sum minus the coordinator's own input
is the organization's update and example count, exactly; and in any session a
coordinator that may unmask a sum of fewer inputs (a low t, or survivors it
pretends dropped) narrows it down. Defence: at advertise, before it makes a
key, an organization refuses (PolicyViolation ``min_secure_session``; no key,
no data sent) a session with N < F or t < F (``Session.check_floor``). Rule:
**N ≥ F, t ≥ F and t > N/2.** An honest organization reveals shares only for a
survivor set of at least t (and, below, only for one that t peers signed), so
the only sum that can be unmasked holds at least t ≥ F inputs; t > N/2 keeps
two disjoint groups from revealing both secrets of one organization. The
coordinator offers t = max(⌊N/2⌋+1, min(N, 3), ``secagg-threshold``):
3 organizations get t = 3 (no dropout after masking is then survivable).

*Attack: parties of the coordinator's own, or its keys in a peer's place.*
Unsigned, an advertised key is the coordinator's word: it can invent F − 1
participants (the floor alone then stops only a careless coordinator, and the
peer-level leak of a 2-party session: the published global is the sum), or swap
a peer's keys for its own and open the shares sealed for it. Defence: each
organization signs (session digest, its index, its two X25519 keys) with its
node key (ECDSA, P-384 by default); an organization that pins a roster accepts
a session only if every other member is signed, for this very session and
index, by a distinct key of its roster (else SessionRefused, naming the index
and the key). The coordinator must then recruit enrolled organizations, not
invent them. The coordinator also refuses a signature that does not verify and
one node key on two indices. Without a roster (``--insecure``, simulation, or
no file) signatures are not checked: the floor is the only defence.

*Attack: different survivor sets for different organizations.* Telling some
organizations that u survived and others that u dropped yields both u's
self-mask seed and its mask key, hence its input; telling each a different
subset lets it unmask a sum of fewer than t inputs. Defence (signed sessions):
the consistency stage — every survivor signs (U3, dropped) once; an
organization that pins a roster reveals shares only for the sets it signed and
only with at least t valid roster signatures of survivors on them. Two
different sets would each need t signers, and honest ones sign once:
impossible when **2t > N + c**. With t = ⌊N/2⌋+1 that tolerates c = 2t − N − 1
colluding participants (0 for odd N, 1 for even N); raise ``secagg-threshold``
for more.

*Attack: a bad unmask share.* One garbage share used to fail the whole round
and name nobody. Defence: at share keys each dealer publishes
SHA-256(session, dealer, holder, kind, share) for every share it deals; the
holder checks the shares it receives against them at mask time (and refuses,
naming the dealer, if they differ: it could be blamed for the dealer's lie);
at unmask the coordinator checks every revealed share against its dealer's
commitment, refuses the whole reply of an organization that revealed one that
does not match — reason ``secure_aggregation``, the detail naming who revealed
whose share of what — and unmasks from the others if at least t remain (the
round's sum still holds that organization's input: it masked honestly). The
commitments hide the shares: a share is uniform given fewer than t others, and
checking a guess needs the dealer's 256-bit secret. A dealer that commits to
shares that are not a sharing of its secret (no polynomial commitments here:
Feldman's would need a group we do not have in ``cryptography``) is caught
when the verified shares do not rebuild its committed seed or advertised key,
and named; that round has no aggregate.

*Attack: an out-of-range input.* The weight slot and the values are the
organization's own. What is enforced: the protocol's bounds on the sum — a
weight sum in [survivors, survivors·W] and every value within the weight
sum's share of the clip (``finish``: anything else is refused, without a name,
as no one input is seen). Not enforceable without zero-knowledge range proofs:
**an organization can mask any value in range of its own slot** — a weight up to
``secagg-max-weight`` W whatever its example count, every coordinate anywhere
in ±``secagg-clip`` whatever it trained (under DP-FedAvg: any vector of norm C
with weight 1), and even beyond its slot as long as the sum stays in range; its
correction vector after dropouts is as unchecked as its input. Clipping and
the max weight bound its pull on each coordinate of the mean to C·W/Σw.

Not defended:

* a coordinator that is not held to a pinned roster (see above);
* collusion of the coordinator with c ≥ 2t − N participants of a session (with
  c ≥ t they hold enough shares of anyone's secrets between them);
* repeated sessions over one global: each attempt of a round (a retry after a
  failed attempt) trains again on the same global; a coordinator that unmasks
  sums over different participant sets can difference them. An organization
  would have to refuse to reveal unmask shares twice for one job and round —
  not built;
* denial of service: any organization (bad sealed shares, an inconsistent
  sharing, a missed deadline) or the coordinator can stop a round; the
  defences above name who where that is possible, and never produce a wrong
  model;
* what the coordinator learns by design: the sum (under DP-FedAvg before its
  noise), the total weight, who took part, the headers.
"""

from server.secure_aggregation.coordinator import SecAggCoordinator, SecAggResult
from server.secure_aggregation.round import SecureOutcome, SecureRound, SecureSettings, max_reply_bytes

__all__ = ["SecAggCoordinator", "SecAggResult", "SecureOutcome", "SecureRound", "SecureSettings", "max_reply_bytes"]
