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

The four stages of a round (each a TRAIN message to every organization still
in, carrying ``wire.SECAGG_RECORD``; each closed by a deadline):

1. advertise — each sampled organization gets the session (its index, the
   participants, threshold t, ring, P, PRG) and answers with two public keys;
   those that do form U1, the roster;
2. share keys — the roster goes to U1; each answers with Shamir shares of its
   mask private key and of a fresh self-mask seed, sealed for every other
   member, and a commitment to the seed; those that do form U2;
3. mask — each member of U2 gets the usual train instruction (encoded global,
   round config) plus the sealed shares addressed to it; it trains, masks its
   delta (update − global over the shared factors, and its weight) and answers
   with the masked ring vector, which the coordinator adds to a running sum
   and drops; those whose input arrives form U3, the survivors;
4. unmask — the survivors learn U3 and the dropped U2 \\ U3 and answer with
   shares of every survivor's seed and every dropped one's mask key (never
   both for one organization) and, after dropouts, the sum of their own masks
   shared with the dropped ones (so the coordinator expands N + (survivors
   without one)·d masks, not N + d·(N−d)); from any t of them the coordinator
   removes the masks and dequantizes.

What the coordinator learns: the example-weighted mean delta of the
survivors (under DP-FedAvg, the sum of their clipped deltas) and their total
weight; who answered each stage; every organization's public keys and
commitment; each masked input's header (job, round, base model, adapter
config, tensor names and shapes: no example count, no metrics) and the
organization's name. Never one organization's update, example count or
metrics: a masked input alone is uniform in the ring.
"""

from server.secure_aggregation.coordinator import SecAggCoordinator, SecAggResult
from server.secure_aggregation.round import SecureOutcome, SecureRound, SecureSettings, max_reply_bytes

__all__ = ["SecAggCoordinator", "SecAggResult", "SecureOutcome", "SecureRound", "SecureSettings", "max_reply_bytes"]
