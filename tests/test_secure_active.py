"""Secure aggregation against a malicious coordinator (server/secure_aggregation/__init__.py,
"Secure aggregation: what it defends"): the organizations' answers through the real
client code (clients/secure_aggregation.py, clients/app.py), the coordinator's round
over a scripted Grid (tests/test_secure_round.py's SecureGrid), no Ray, no model.

1. The session floor: a coordinator that puts one organization in a session with a
   participant it runs reads that organization's update from the sum — unless the
   organization refuses a session (or a threshold) below its floor, before it makes a key.
2. A bad unmask share is checked against its dealer's commitment, named, left out,
   and the round completes on the others.
3. Signed keys: with a pinned roster of its peers' node keys, an organization refuses a
   forged advertisement, a party outside the roster, an unsigned one, and unmask
   requests whose survivor set it cannot see that t of its peers signed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import secure_aggregation as client_side
from clients.app import app as client_app
from clients.node_config import POLICY_PATH_KEY, SIGNING_KEY_KEY, TRUSTED_PEERS_KEY
from clients.policy import PolicyViolation
from protos import codec
from protos.secagg import MaskingClient, RingSpec, SecAggError, Session, keys, wire
from protos.secagg.identity import TrustedPeers, advertisement_message, fingerprint, identity_of, sign
from protos.secagg.layout import flatten, layout_of
from runtime.keys import create_org_key, load_org_private_key
from server.secure_aggregation import SecAggCoordinator
from test_secure_round import LORA, SHAPES, SecureGrid, _plain, _run

NODES = [1, 2, 3, 4, 5]   # t = 3


# ---- 1. the session floor ----------------------------------------------------------------
def _two_party_session(threshold: int = 2) -> Session:
    length = sum(int(np.prod(s)) for s in SHAPES.values())
    return Session(b"sybil-session-0001", (1, 2), threshold, RingSpec.derive(2, 0.05, 10_000), length)


def _global():
    rng = np.random.default_rng(0)
    return {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _victim_trainer(content: RecordDict) -> RecordDict:
    """The honest organization's training: a secret update, 37 examples."""
    header, start = codec.decode(content)
    rng = np.random.default_rng(99)
    update = {k: v + np.float32(0.003) * rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}
    return codec.encode(update, kind=codec.Kind.Value("UPDATE"), job_id="j", server_round=header.round,
                        fingerprint=header.base_model_fingerprint, lora=LORA, num_examples=37)


def _sybil_attack(node_config: dict) -> tuple[np.ndarray, int]:
    """A coordinator puts the victim (index 1) in a session of 2 with a participant it runs
    (index 2), goes through every stage with it, and subtracts its own input from the sum:
    the victim's quantized update and example count, exactly. What today's main allowed."""
    session = _two_party_session()
    sid = session.session_id
    state = RecordDict()

    def ask(record) -> RecordDict:
        content = RecordDict({wire.SECAGG_RECORD: record})
        return client_side.handle(content, state, _victim_trainer, node_config)

    sybil = MaskingClient(session, 2)
    coordinator = SecAggCoordinator(session)
    _, victim_keys = wire.parse_advertise_reply(ask(wire.advertise_instruction(session, 1)), sid)
    coordinator.add_keys(1, victim_keys)
    coordinator.add_keys(2, sybil.advertise())
    roster = coordinator.roster()
    _, victim_shares = wire.parse_share_keys_reply(ask(wire.share_keys_instruction(sid, roster)), sid)
    coordinator.add_shares(1, victim_shares)
    coordinator.add_shares(2, sybil.share_keys(roster))
    routing = coordinator.routing()
    global_adapter = _global()
    train = codec.encode(global_adapter, kind=codec.Kind.Value("GLOBAL"), job_id="j", server_round=1,
                         fingerprint="f", lora=LORA)
    train[wire.SECAGG_RECORD] = wire.mask_instruction(sid, routing[1], coordinator.commitments_for(1))
    _, masked = wire.parse_mask_reply(client_side.handle(train, state, _victim_trainer, node_config), sid)
    coordinator.add_masked(1, np.array(masked))
    zero = np.zeros(session.length, np.float32)
    coordinator.add_masked(2, sybil.mask(routing[2], zero, 1, coordinator.commitments_for(2)))
    survivors, dropped = coordinator.unmask_request()
    _, victim_unmask = wire.parse_unmask_reply(ask(wire.unmask_instruction(sid, survivors, dropped)), sid)
    coordinator.add_unmask(1, victim_unmask)
    coordinator.add_unmask(2, sybil.unmask(survivors, dropped))
    result = coordinator.finish()
    victim_weight = result.weight_sum - 1          # the sybil's weight is 1, its update 0
    return result.mean * result.weight_sum / victim_weight, victim_weight


def _policy(tmp_path: Path, floor: int) -> dict:
    path = tmp_path / f"policy-{floor}.yaml"
    path.write_text(f"min_secure_session: {floor}\n")
    return {POLICY_PATH_KEY: str(path)}


def test_a_two_party_sybil_session_reads_the_update_when_the_floor_allows_it(tmp_path):
    """The attack, against an organization whose policy lowers its floor to 2."""
    recovered, weight = _sybil_attack(_policy(tmp_path, 2))
    assert weight == 37                                                   # its example count, exactly
    start = _global()
    _, trained = codec.decode(_victim_trainer(codec.encode(start, kind=codec.Kind.Value("GLOBAL"), job_id="j",
                                                           server_round=1, fingerprint="f", lora=LORA)))
    layout = layout_of(start)
    update = flatten(trained, layout).astype(np.float64) - flatten(start, layout)
    assert np.abs(update).max() > 1e-3                                    # a real update ...
    step = _two_party_session().ring.step
    assert np.abs(recovered - update).max() <= step * 10_000 / 37          # ... read to the ring's step


def test_the_two_party_sybil_session_is_refused_at_advertise_through_the_client_app():
    """The default floor (3): the ClientApp refuses the advertise message of a session of 2
    before it makes a key — the error reply names the rule, no state is kept, nothing is sent."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    session = _two_party_session()
    message = Message(RecordDict({wire.SECAGG_RECORD: wire.advertise_instruction(session, 1)}), dst_node_id=7,
                      message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(PolicyViolation) as refused:
        client_app(message, context)
    assert str(refused.value) == "policy_violation: min_secure_session"
    assert "a session of 2 organizations, below this organization's floor of 3" in refused.value.detail
    assert wire.STATE_RECORD not in context.state.config_records      # no keys made, none kept
    with pytest.raises(PolicyViolation):                               # and the whole attack stops there
        _sybil_attack({})


@pytest.mark.parametrize("n,t,floor,refused", [
    (5, 3, 4, "threshold 3 would let a sum of 3 inputs be unmasked, below this organization's floor of 4"),
    (3, 2, 3, "threshold 2 would let a sum of 2 inputs be unmasked, below this organization's floor of 3"),
    (5, 4, 4, None),
    (3, 3, 3, None),
])
def test_a_threshold_below_the_floor_is_refused(tmp_path, n, t, floor, refused):
    """The sum the coordinator can unmask holds at least t inputs: t below the floor is
    refused like a small session (and t > N/2 holds for every valid session)."""
    session = Session(b"threshold-session", tuple(range(1, n + 1)), t, RingSpec.derive(n, 0.05, 10), 10)
    content = RecordDict({wire.SECAGG_RECORD: wire.advertise_instruction(session, 1)})
    state = RecordDict()
    if refused is None:
        client_side.handle(content, state, _victim_trainer, _policy(tmp_path, floor))
        assert wire.STATE_RECORD in state.config_records
        return
    with pytest.raises(PolicyViolation) as refusal:
        client_side.handle(content, state, _victim_trainer, _policy(tmp_path, floor))
    assert refused in refusal.value.detail and wire.STATE_RECORD not in state.config_records


def test_the_coordinator_offers_three_organizations_a_threshold_of_three():
    nodes = [1, 2, 3]
    grid = SecureGrid({n: 0.002 for n in nodes}, {n: 10 for n in nodes})
    outcome, strategy, global_adapter = _run(grid)
    assert outcome.failure == "" and outcome.accepted == nodes     # the default floor accepts t = 3 of 3
    secure = strategy.finish_round()
    plain = _plain(grid, nodes, global_adapter)
    for name in SHAPES:
        np.testing.assert_allclose(secure[name], plain[name], rtol=0, atol=outcome.error_bound + 1e-7)


def test_a_session_of_two_is_refused_by_name_at_every_organization():
    grid = SecureGrid({n: 0.002 for n in (1, 2)}, {n: 10 for n in (1, 2)})
    outcome, _, _ = _run(grid)
    assert outcome.accepted == [] and "threshold" in outcome.failure
    assert [(node, reason) for node, reason, _ in outcome.rejected] == [(1, "client_error"), (2, "client_error")]
    assert all("advertise: the organization failed at advertise" in d and "policy_violation: min_secure_session" in d
               for _, _, d in outcome.rejected)
    assert grid.stages == [(wire.ADVERTISE, 1), (wire.ADVERTISE, 2)]


# ---- 2. a bad unmask share ---------------------------------------------------------------
def _tamper_replies(grid: SecureGrid, stage: str, node: int, change) -> None:
    real_pull = grid.pull_messages

    def pull(ids):  # type: ignore[no-untyped-def]
        replies = list(real_pull(ids))
        for reply in replies:
            if not reply.has_error() and reply.metadata.src_node_id == node \
                    and wire.stage_of(reply.content)[0] == stage:
                change(reply.content.config_records[wire.SECAGG_RECORD])
        return replies

    grid.pull_messages = pull  # type: ignore[method-assign]


def test_a_bad_unmask_share_is_named_and_excluded_and_the_round_completes():
    grid = SecureGrid({n: 0.001 * n for n in NODES}, {n: 10 * n for n in NODES})

    def corrupt(record) -> None:
        shares = list(record["seed_shares"])
        shares[0] = bytes(len(shares[0]))            # its share of org 1's self-mask seed, zeroed
        record["seed_shares"] = shares

    _tamper_replies(grid, wire.UNMASK, 2, corrupt)
    outcome, strategy, global_adapter = _run(grid)
    assert outcome.failure == ""
    assert outcome.accepted == NODES                  # 2 masked honestly: its input is in the sum
    assert outcome.rejected == [(2, "secure_aggregation",
                                 "unmask: 2 (index 2) revealed a share of 1 (index 1)'s self-mask seed that is not "
                                 "the one 1 (index 1) committed to dealing it: 2 (index 2)'s unmask shares are not used")]
    secure = strategy.finish_round()
    plain = _plain(grid, NODES, global_adapter)     # the honest sum of all five
    for name in SHAPES:
        np.testing.assert_allclose(secure[name], plain[name], rtol=0, atol=outcome.error_bound + 1e-7)


def test_bad_shares_below_the_threshold_stop_the_round_with_the_threshold_named():
    grid = SecureGrid({n: 0.001 * n for n in NODES}, {n: 10 * n for n in NODES})

    def corrupt(record) -> None:
        record["seed_shares"] = [bytes(len(s)) for s in record["seed_shares"]]

    for node in (1, 2, 3):
        _tamper_replies(grid, wire.UNMASK, node, corrupt)
    outcome, _, _ = _run(grid)
    assert outcome.accepted == [] and "2 organization(s) sent unmask shares that verify, the threshold is 3" \
        in outcome.failure
    assert sorted(node for node, _, _ in outcome.rejected) == [1, 2, 3]


# ---- 3. signed keys and a pinned roster -------------------------------------------------------
@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> dict:
    """Node keys for org-1 … org-5 and a roster file with their public keys (as ORG.pub is written)."""
    root = tmp_path_factory.mktemp("federation")
    files = {n: create_org_key(root / "keys", f"org-{n}") for n in NODES}
    roster = root / "trusted-peers"
    roster.write_text("# the consortium, from each organization\n"
                      + "".join(files[n].public_key.read_text() for n in NODES))
    intruder = create_org_key(root / "keys", "intruder")
    return {"keys": files, "roster": roster, "intruder": intruder}


def _configs(federation: dict, pinned: bool = True) -> dict[int, dict]:
    return {n: {SIGNING_KEY_KEY: str(federation["keys"][n].private_key),
                **({TRUSTED_PEERS_KEY: str(federation["roster"])} if pinned else {})} for n in NODES}


def _tamper_instructions(grid: SecureGrid, stage: str, change, nodes=None) -> None:
    """``change(record, node)`` on the instruction of ``stage`` to each of ``nodes`` (all: None),
    as a malicious coordinator would send it (a copy per node)."""
    real_push = grid.push_messages

    def push(messages):  # type: ignore[no-untyped-def]
        for message in messages:
            record = message.content.config_records.get(wire.SECAGG_RECORD)
            node = message.metadata.dst_node_id
            if record is not None and record["stage"] == stage and (nodes is None or node in nodes):
                content = RecordDict(dict(message.content.items()))
                copy = type(record)(dict(record.items()))
                change(copy, node)
                content[wire.SECAGG_RECORD] = copy
                message.content = content
        return real_push(messages)

    grid.push_messages = push  # type: ignore[method-assign]


def test_a_signed_round_with_a_pinned_roster_equals_the_plain_round(federation):
    grid = SecureGrid({n: 0.001 * n for n in NODES}, {n: 10 * n for n in NODES}, node_configs=_configs(federation))
    outcome, strategy, global_adapter = _run(grid, timeout=2.0)
    assert outcome.failure == "" and outcome.accepted == NODES and outcome.rejected == []
    assert [s for s, _ in grid.stages] == [wire.ADVERTISE] * 5 + [wire.SHARE_KEYS] * 5 + [wire.MASK] * 5 \
        + [wire.CONSISTENCY] * 5 + [wire.UNMASK] * 5
    secure = strategy.finish_round()
    plain = _plain(grid, NODES, global_adapter)
    for name in SHAPES:
        np.testing.assert_allclose(secure[name], plain[name], rtol=0, atol=outcome.error_bound + 1e-7)


def _remember_sessions(grid: SecureGrid) -> dict[int, Session]:
    """The session each node was sent at advertise (what the coordinator knows anyway)."""
    sessions: dict[int, Session] = {}
    real_push = grid.push_messages

    def push(messages):  # type: ignore[no-untyped-def]
        for message in messages:
            record = message.content.config_records.get(wire.SECAGG_RECORD)
            if record is not None and record["stage"] == wire.ADVERTISE:
                sessions[message.metadata.dst_node_id] = Session.from_json(record["session"])
        return real_push(messages)

    grid.push_messages = push  # type: ignore[method-assign]
    return sessions


def _forge_index_3(federation: dict, how: str, sessions: dict[int, Session]):
    """A coordinator's change to the share-keys roster: index 3's keys replaced by keys it
    holds, under org-3's signature (``swap``) or signed by a key of its own (``intruder``)."""
    _, mask = keys.generate()
    _, encryption = keys.generate()

    def change(record, node) -> None:
        members = list(record["members"])
        k = members.index(3)
        masks, encryptions = list(record["masks"]), list(record["encryptions"])
        identities, signatures = list(record["identities"]), list(record["signatures"])
        masks[k], encryptions[k] = mask, encryption
        if how == "intruder":
            signer = load_org_private_key(federation["intruder"].private_key)
            session = sessions[node]
            identities[k] = identity_of(signer)
            signatures[k] = sign(signer, advertisement_message(session.digest(), 3, mask, encryption))
        record["masks"], record["encryptions"] = masks, encryptions
        record["identities"], record["signatures"] = identities, signatures

    return change


@pytest.mark.parametrize("how,named", [
    ("swap", "the keys of index 3 are not signed by the key of org-3 they name"),
    ("intruder", "the keys of index 3 are signed by SHA256:"),
])
def test_a_forged_key_advertisement_is_refused_when_a_roster_is_pinned(federation, how, named):
    grid = SecureGrid({n: 0.002 for n in NODES}, {n: 10 for n in NODES}, node_configs=_configs(federation))
    sessions = _remember_sessions(grid)
    _tamper_instructions(grid, wire.SHARE_KEYS, _forge_index_3(federation, how, sessions), nodes={1, 2, 4, 5})
    outcome, _, _ = _run(grid, timeout=2.0)
    assert outcome.accepted == [] and "1 organization(s) shared keys, the threshold is 3" in outcome.failure
    refused = {node: detail for node, reason, detail in outcome.rejected}
    assert sorted(refused) == [1, 2, 4, 5]              # org-3 was sent the true roster: it alone dealt shares
    for node in (1, 2, 4, 5):
        assert named in refused[node] and "SessionRefused" in refused[node]
    if how == "intruder":
        fp = fingerprint(identity_of(load_org_private_key(federation["intruder"].private_key)))
        assert f"signed by {fp}, which is not in this organization's trusted peers" in refused[1]
    assert not any(stage == wire.MASK for stage, _ in grid.stages)   # nobody trained, nothing was masked


def test_without_a_roster_the_same_forgery_is_accepted(federation):
    """What the session floor alone cannot stop: unsigned keys (or keys signed by anyone) are
    taken on the coordinator's word. Here org-1 deals its shares to the coordinator's keys."""
    configs = _configs(federation, pinned=False)
    grid = SecureGrid({n: 0.002 for n in NODES}, {n: 10 for n in NODES}, node_configs=configs)
    sessions = _remember_sessions(grid)
    _tamper_instructions(grid, wire.SHARE_KEYS, _forge_index_3(federation, "intruder", sessions), nodes={1, 2, 4, 5})
    _run(grid, timeout=2.0)
    assert (wire.MASK, 1) in grid.stages                # org-1 went on: it trusted the forged keys


def test_an_unsigned_peer_is_refused_under_a_pinned_roster(federation):
    configs = _configs(federation)
    configs[4] = {}                                     # org-4 runs without its node key
    grid = SecureGrid({n: 0.002 for n in NODES}, {n: 10 for n in NODES}, node_configs=configs)
    outcome, _, _ = _run(grid, timeout=2.0)
    refused = {node: detail for node, _, detail in outcome.rejected}
    assert "the keys of index 4 are not signed, and this organization pins its peers" in refused[1]
    assert 4 not in refused                             # org-4 itself pins nothing


def test_unmask_requests_without_the_survivors_signatures_are_refused(federation):
    """The coordinator drops the consistency signatures (or shows a set that t peers did not
    sign): an organization that pins its peers reveals no share."""
    grid = SecureGrid({n: 0.002 for n in NODES}, {n: 10 for n in NODES}, node_configs=_configs(federation))

    def strip(record, node) -> None:
        record["signers"], record["signatures"] = [], []

    _tamper_instructions(grid, wire.UNMASK, strip)
    outcome, _, _ = _run(grid, timeout=2.0)
    assert outcome.accepted == [] and "threshold" in outcome.failure
    assert all("0 valid signature(s) of survivors on the survivor set, the threshold is 3: refusing to reveal "
               "shares" in detail for _, _, detail in outcome.rejected)


def test_different_survivor_sets_for_different_organizations_are_refused(federation):
    """Org 1 is told that 5 dropped (so 5's mask key would be revealed by org 1 while the
    others reveal 5's self-mask seed): org 1 signed the true sets and refuses."""
    grid = SecureGrid({n: 0.002 for n in NODES}, {n: 10 for n in NODES}, node_configs=_configs(federation))

    def lie(record, node) -> None:
        record["survivors"], record["dropped"] = [1, 2, 3, 4], [5]

    _tamper_instructions(grid, wire.UNMASK, lie, nodes={1})
    outcome, _, _ = _run(grid, timeout=2.0)
    refused = {node: detail for node, _, detail in outcome.rejected}
    assert "other survivors or dropped organizations than the ones this organization signed" in refused[1]
    assert outcome.failure == "" and outcome.accepted == NODES     # the other four unmask the true sum


def test_the_roster_file_and_the_wire_version():
    with pytest.raises(SecAggError, match="line 2: not an ECDSA public key"):
        TrustedPeers.parse("# peers\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ bank\n", "peers.txt")
    with pytest.raises(SecAggError, match="names no peer"):
        TrustedPeers.parse("# nobody\n\n", "peers.txt")
    peers = TrustedPeers.parse("SHA256:" + "A" * 43 + " bank-a\n", "peers.txt")
    assert "SHA256:" + "A" * 43 in peers.fingerprints and len(peers) == 1
    old = RecordDict({wire.SECAGG_RECORD: wire.advertise_instruction(_two_party_session(), 1)})
    del old.config_records[wire.SECAGG_RECORD]["version"]            # a version-1 message
    with pytest.raises(SecAggError, match="protocol version 1; this side speaks 2"):
        client_side.handle(old, RecordDict(), _victim_trainer, {})


def test_the_coordinator_checks_signatures_it_can_check():
    """The coordinator cannot know whom an organization trusts, but it refuses what no
    honest organization sends: a signature that does not verify under the node key it names,
    one node key on two indices, a consistency signature that does not verify, and
    unmask shares from a survivor that did not sign the survivor set."""
    from cryptography.hazmat.primitives.asymmetric import ec

    n = 5
    session = Session(b"coordinator-checks", tuple(range(1, n + 1)), 3, RingSpec.derive(n, 0.05, 10), 20)
    signers = {i: ec.generate_private_key(ec.SECP384R1()) for i in session.participants}
    clients = {i: MaskingClient(session, i, signer=signers[i]) for i in session.participants}
    coordinator = SecAggCoordinator(session)
    forged = clients[2].public_keys
    _, other_mask = keys.generate()
    with pytest.raises(SecAggError, match="the keys of 2 are not signed by the node key they name"):
        coordinator.add_keys(2, type(forged)(other_mask, forged.encryption, forged.identity, forged.signature))
    coordinator.add_keys(1, clients[1].advertise())
    twice = MaskingClient(session, 3, signer=signers[1]).advertise()      # org 1's key on index 3
    with pytest.raises(SecAggError, match="one organization counted twice"):
        coordinator.add_keys(3, twice)
    for i in (2, 3, 4, 5):
        coordinator.add_keys(i, clients[i].advertise())
    roster = coordinator.roster()
    assert coordinator.signed
    for i in roster:
        coordinator.add_shares(i, clients[i].share_keys(roster))
    for i, sealed in coordinator.routing().items():
        coordinator.add_masked(i, clients[i].mask(sealed, np.zeros(20), 1, coordinator.commitments_for(i)))
    survivors, dropped = coordinator.unmask_request()
    signatures = {i: clients[i].consistency(survivors, dropped, signers[i]) for i in survivors}
    with pytest.raises(SecAggError, match="5's signature of the survivors does not verify"):
        coordinator.add_consistency(5, signatures[4])
    for i in (1, 2, 3, 4):
        coordinator.add_consistency(i, signatures[i])
    assert sorted(coordinator.consistency_signatures()) == [1, 2, 3, 4]
    with pytest.raises(SecAggError, match="from 5, which did not sign the survivor set"):
        coordinator.add_unmask(5, clients[5].unmask(survivors, dropped))
