"""Secure aggregation (protos/secagg + server/secure_aggregation/coordinator.py): the protocol as a library.

The coordinator's unmasked result equals the plain weighted mean within the
quantization error, with no dropout and with N − t organizations dropping
after masking; below the threshold it refuses with a ThresholdError; a single
masked input is statistically uniform and uncorrelated with the update, even
for a coordinator that reconstructed the sender's pairwise masks.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from protos.secagg import MaskingClient, RingSpec, SecAggError, Session, ThresholdError, keys, prg, shamir
from protos.secagg.layout import flatten, layout_of, unflatten
from protos.secagg.messages import UnmaskShares
from server.secure_aggregation import SecAggCoordinator
from strategies.fedavg import FedAvg

CLIP = 0.05
MAX_WEIGHT = 1000


def _session(n: int, length: int, threshold: int | None = None, **ring_kw) -> Session:
    ring = RingSpec.derive(n, CLIP, MAX_WEIGHT, **ring_kw)
    return Session(os.urandom(16), tuple(range(1, n + 1)), threshold or Session.default_threshold(n), ring, length)


def _updates(n: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, CLIP / 4, (n, length)).clip(-CLIP, CLIP).astype(np.float32), rng.integers(1, MAX_WEIGHT, n)


def _masked(session, updates, weights, drop_before_masked=(), corrections=True):
    """A session in process up to the masked inputs; returns (clients, coordinator)."""
    clients = {i: MaskingClient(session, i) for i in session.participants}
    coordinator = SecAggCoordinator(session, survivor_corrections=corrections)
    for i, client in clients.items():
        coordinator.add_keys(i, client.advertise())
    roster = coordinator.roster()
    for i in roster:
        coordinator.add_shares(i, clients[i].share_keys(roster))
    for i, sealed in coordinator.routing().items():
        masked = clients[i].mask(sealed, updates[i - 1], int(weights[i - 1]))  # every one masks ...
        if i not in drop_before_masked:                                         # ... some never arrive
            coordinator.add_masked(i, masked)
    return clients, coordinator


def _run(session, updates, weights, drop_before_masked=(), drop_before_unmask=(), corrections=True):
    """One whole session in process; returns (result, clients, coordinator)."""
    clients, coordinator = _masked(session, updates, weights, drop_before_masked, corrections)
    survivors, dropped = coordinator.unmask_request()
    for i in survivors:
        if i not in drop_before_unmask:
            coordinator.add_unmask(i, clients[i].unmask(survivors, dropped, coordinator.asks_corrections))
    return coordinator.finish(), clients, coordinator


def _plain_mean(updates, weights, indices):
    rows = [i - 1 for i in indices]
    w = weights[rows].astype(np.float64)
    return (updates[rows].astype(np.float64) * w[:, None]).sum(axis=0) / w.sum()


def _assert_close(result, plain):
    # quantization error, plus the float32 rounding of the result
    tolerance = result.error_bound + np.abs(plain) * 2.0**-24 + 1e-30
    assert np.all(np.abs(result.mean.astype(np.float64) - plain) <= tolerance)


# ---- the protocol end to end -------------------------------------------------
@pytest.mark.parametrize("n", [5, 6, 7, 8, 9, 10])
@pytest.mark.parametrize("dropouts,corrections", [("none", True), ("n-t after masking", True),
                                                  ("n-t after masking", False)])
def test_secure_mean_equals_plain_mean(n, dropouts, corrections):
    session = _session(n, 1500)
    updates, weights = _updates(n, session.length, seed=n)
    dropped = set()
    if dropouts != "none":
        rng = np.random.default_rng(n)
        dropped = {int(i) for i in rng.choice(session.participants, n - session.threshold, replace=False)}
    result, _, _ = _run(session, updates, weights, drop_before_masked=dropped, corrections=corrections)
    survivors = sorted(set(session.participants) - dropped)
    assert result.survivors == survivors and result.dropped == sorted(dropped)
    assert result.weight_sum == int(weights[[i - 1 for i in survivors]].sum())
    _assert_close(result, _plain_mean(updates, weights, survivors))
    assert result.error_bound < 1e-7  # a 32-bit ring is fine-grained at these sizes


@pytest.mark.parametrize("corrections", [True, False])
def test_dropouts_at_every_stage_after_masking(corrections):
    """Some masked inputs never arrive, and some survivors never send unmask shares
    (nor their corrections): t responders suffice, the late survivors' inputs still
    count, and their masks with the dropped are removed from the reconstructed keys."""
    n = 9
    session = _session(n, 800, threshold=6)
    updates, weights = _updates(n, session.length, seed=3)
    result, _, _ = _run(session, updates, weights, drop_before_masked={2, 5}, drop_before_unmask={1},
                        corrections=corrections)
    survivors = [1, 3, 4, 6, 7, 8, 9]
    assert result.survivors == survivors
    _assert_close(result, _plain_mean(updates, weights, survivors))


def test_dropout_before_sharing_keys_is_left_out():
    n = 6
    session = _session(n, 300, threshold=4)
    updates, weights = _updates(n, session.length)
    clients = {i: MaskingClient(session, i) for i in session.participants}
    coordinator = SecAggCoordinator(session)
    for i, client in clients.items():
        coordinator.add_keys(i, client.advertise())
    roster = coordinator.roster()
    for i in [1, 2, 3, 4, 6]:                    # 5 never shares keys
        coordinator.add_shares(i, clients[i].share_keys(roster))
    for i, sealed in coordinator.routing().items():
        coordinator.add_masked(i, clients[i].mask(sealed, updates[i - 1], int(weights[i - 1])))
    survivors, dropped = coordinator.unmask_request()
    assert (survivors, dropped) == ([1, 2, 3, 4, 6], [])
    for i in survivors:
        coordinator.add_unmask(i, clients[i].unmask(survivors, dropped))
    _assert_close(coordinator.finish(), _plain_mean(updates, weights, survivors))


def test_secure_fedavg_equals_plain_fedavg_on_adapters():
    """The library on an adapter (name → tensor): same result as our FedAvg strategy."""
    rng = np.random.default_rng(7)
    shapes = {"m.lora_A.weight": (4, 16), "m.lora_B.weight": (16, 4), "n.lora_A.weight": (4, 8)}
    adapters = [{k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()} for _ in range(6)]
    weights = np.array([10, 200, 35, 999, 1, 64])
    layout = layout_of(shapes)
    session = _session(6, 64 + 64 + 32)
    flat = np.stack([flatten(a, layout) for a in adapters])
    result, _, _ = _run(session, flat, weights)
    fedavg = FedAvg()
    fedavg.begin_round(1, {k: np.zeros(s, np.float32) for k, s in shapes.items()})
    for adapter, w in zip(adapters, weights):
        fedavg.accumulate(adapter, int(w))
    plain = fedavg.finish_round()
    secure = unflatten(result.mean, layout)
    for name in shapes:  # both rounded to float32 at the end: one ulp each
        tolerance = result.error_bound + 2.0**-23 * np.abs(plain[name])
        assert np.all(np.abs(secure[name].astype(np.float64) - plain[name]) <= tolerance)


# ---- the threshold -----------------------------------------------------------
def test_more_than_n_minus_t_dropouts_cannot_be_unmasked():
    n = 7
    session = _session(n, 200, threshold=5)
    updates, weights = _updates(n, session.length)
    with pytest.raises(ThresholdError, match="threshold is 5"):
        _run(session, updates, weights, drop_before_masked={1, 2, 3})


def test_too_few_unmask_responders_cannot_unmask():
    session = _session(7, 200, threshold=5)
    updates, weights = _updates(7, session.length)
    with pytest.raises(ThresholdError, match="sent unmask shares"):
        _run(session, updates, weights, drop_before_masked={1}, drop_before_unmask={2, 3})


def test_client_refuses_to_reveal_below_threshold_or_both_secrets():
    session = _session(5, 50, threshold=3)
    updates, weights = _updates(5, 50)

    def masked_clients():
        clients = {i: MaskingClient(session, i) for i in session.participants}
        roster = {i: c.advertise() for i, c in clients.items()}
        sealed = {i: c.share_keys(roster).sealed for i, c in clients.items()}
        for i, c in clients.items():
            c.mask({j: sealed[j][i] for j in clients if j != i}, updates[i - 1], int(weights[i - 1]))
        return clients

    with pytest.raises(ThresholdError, match="refusing"):
        masked_clients()[1].unmask([1, 2], [3, 4, 5])
    with pytest.raises(SecAggError, match="both as survivors and as dropped"):
        masked_clients()[1].unmask([1, 2, 3, 4], [4, 5])
    with pytest.raises(SecAggError, match="do not make up"):
        masked_clients()[1].unmask([1, 2, 3], [4])


def test_session_parameters_are_checked():
    ring = RingSpec.derive(6, CLIP, MAX_WEIGHT)
    with pytest.raises(SecAggError, match="t > N/2"):
        Session(os.urandom(16), tuple(range(1, 7)), 3, ring, 10).validate()
    with pytest.raises(SecAggError, match="ring sized for 6"):
        Session(os.urandom(16), tuple(range(1, 9)), 5, ring, 10).validate()
    session = Session(os.urandom(16), tuple(range(1, 7)), 4, ring, 10)
    assert Session.from_json(session.to_json()) == session


# ---- privacy -----------------------------------------------------------------
def _chi_square_uniform_bytes(vector: np.ndarray) -> float:
    """χ² statistic of the byte histogram (255 degrees of freedom: mean 255, sd ≈ 22.6)."""
    counts = np.bincount(np.frombuffer(vector.tobytes(), dtype=np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_single_masked_input_looks_uniform():
    n, length = 5, 50_000
    session = _session(n, length)
    clients = {i: MaskingClient(session, i) for i in session.participants}
    roster = {i: c.advertise() for i, c in clients.items()}
    sealed = {i: c.share_keys(roster).sealed for i, c in clients.items()}
    # a very structured update: a constant, and the largest weight
    update = np.full(length, CLIP, dtype=np.float32)
    masked = clients[1].mask({j: sealed[j][1] for j in clients if j != 1}, update, MAX_WEIGHT)
    quantized = session.ring.quantize(update, MAX_WEIGHT)
    assert len(np.unique(quantized)) == 1
    assert _chi_square_uniform_bytes(masked[:-1]) < 255 + 6 * 22.6   # p ≈ 1e-8 to fail by chance
    assert len(np.unique(masked)) > 0.99 * length
    assert abs(np.corrcoef(masked[:-1].astype(np.float64), np.arange(length))[0, 1]) < 0.05


def test_a_late_input_stays_hidden_behind_its_self_mask():
    """Organization 1 is declared dropped; the coordinator rebuilds its mask key
    and removes every pairwise mask from its (late) input. What remains is
    q + PRG(self-mask seed): still uniform, still uncorrelated with q."""
    n, length = 6, 40_000
    session = _session(n, length, threshold=4)
    clients = {i: MaskingClient(session, i) for i in session.participants}
    roster = {i: c.advertise() for i, c in clients.items()}
    sealed = {i: c.share_keys(roster).sealed for i, c in clients.items()}
    update = np.linspace(-CLIP, CLIP, length, dtype=np.float32)
    late = {}
    for i, c in clients.items():
        late[i] = c.mask({j: sealed[j][i] for j in clients if j != i}, update, 500)
    survivors, dropped = [2, 3, 4, 5, 6], [1]
    answers = {i: clients[i].unmask(survivors, dropped) for i in survivors}
    private = shamir.combine({h: a.mask_key[1] for h, a in answers.items()}, session.threshold)
    stripped = late[1].copy()
    for v in survivors:
        seed = keys.pair_key(private, roster[v].mask, session.session_id, keys.MASK, 1, v)
        prg.apply_masks(stripped, [(seed, -1)], session.ring.ring_bits, session.prg)
    q = session.ring.quantize(update, 500)
    assert _chi_square_uniform_bytes(stripped[:-1]) < 255 + 6 * 22.6
    signed = session.ring.to_signed(stripped[:-1]).astype(np.float64)
    assert abs(np.corrcoef(signed, session.ring.to_signed(q).astype(np.float64))[0, 1]) < 0.05
    # the self-mask is what remains: with its seed (never revealed for a dropped one) q would come back
    assert not np.array_equal(stripped[:-1], q)


def test_tampered_or_misrouted_shares_are_refused():
    session = _session(4, 10, threshold=3)
    clients = {i: MaskingClient(session, i) for i in session.participants}
    roster = {i: c.advertise() for i, c in clients.items()}
    sealed = {i: c.share_keys(roster).sealed for i, c in clients.items()}
    to_1 = {j: sealed[j][1] for j in (2, 3, 4)}
    to_1[2] = to_1[2][:-1] + bytes([to_1[2][-1] ^ 1])
    with pytest.raises(SecAggError, match="do not authenticate"):
        clients[1].mask(to_1, np.zeros(10, np.float32), 1)
    with pytest.raises(SecAggError, match="do not authenticate"):
        clients[2].mask({1: sealed[1][3], 3: sealed[3][2], 4: sealed[4][2]}, np.zeros(10, np.float32), 1)


def _to_unmask(session, updates, weights):
    """Clients and coordinator of a whole session up to the unmask request."""
    clients = {i: MaskingClient(session, i) for i in session.participants}
    coordinator = SecAggCoordinator(session, name=lambda i: f"org-{i}")
    for i, c in clients.items():
        coordinator.add_keys(i, c.advertise())
    roster = coordinator.roster()
    for i in roster:
        coordinator.add_shares(i, clients[i].share_keys(roster))
    for i, sealed in coordinator.routing().items():
        coordinator.add_masked(i, clients[i].mask(sealed, updates[i - 1], int(weights[i - 1]),
                                                  coordinator.commitments_for(i)))
    return clients, coordinator


def test_a_bad_unmask_share_is_named_and_excluded_and_the_sum_still_unmasks():
    """Every share is checked against the commitment its dealer published when it dealt it:
    org-1's reply with one forged share is refused whole, naming org-1 and whose share it was;
    the other four (t = 3) unmask the sum, org-1's input included (it masked honestly)."""
    session = _session(5, 100, threshold=3)
    updates, weights = _updates(5, 100)
    clients, coordinator = _to_unmask(session, updates, weights)
    survivors, dropped = coordinator.unmask_request()
    for i in survivors:
        answer = clients[i].unmask(survivors, dropped)
        if i == 1:
            answer = UnmaskShares(seed={**answer.seed, 2: bytes(shamir.SHARE_BYTES)}, mask_key=answer.mask_key)
            with pytest.raises(SecAggError, match="org-1 revealed a share of org-2's self-mask seed that is not the "
                                                  "one org-2 committed to dealing it: org-1's unmask shares are not used"):
                coordinator.add_unmask(i, answer)
            continue
        coordinator.add_unmask(i, answer)
    result = coordinator.finish()
    assert result.survivors == [1, 2, 3, 4, 5]
    _assert_close(result, _plain_mean(updates, weights, [1, 2, 3, 4, 5]))


def test_a_dealer_that_shares_inconsistently_is_named():
    """A dealer can commit to shares that are not a sharing of its secret (no polynomial
    commitment here: see the package docstring): they verify one by one, but do not rebuild
    the seed it committed to. The round cannot unmask, and the dealer is named."""
    session = _session(5, 50, threshold=3)
    updates, weights = _updates(5, 50)
    clients = {i: MaskingClient(session, i) for i in session.participants}
    coordinator = SecAggCoordinator(session, name=lambda i: f"org-{i}")
    for i, c in clients.items():
        coordinator.add_keys(i, c.advertise())
    roster = coordinator.roster()
    cheat = clients[4]
    real_split = shamir.split

    def skewed(secret, threshold, indices):   # org-4 adds x³: off its degree-2 polynomial
        shares = real_split(secret, threshold, indices)
        if secret == cheat._seed:
            shares = {j: (int.from_bytes(v, "big") + j ** 3).to_bytes(shamir.SHARE_BYTES, "big") for j, v in shares.items()}
        return shares

    for i in roster:
        if i == 4:
            shamir.split = skewed
        try:
            coordinator.add_shares(i, clients[i].share_keys(roster))
        finally:
            shamir.split = real_split
    for i, sealed in coordinator.routing().items():
        coordinator.add_masked(i, clients[i].mask(sealed, updates[i - 1], int(weights[i - 1]),
                                                  coordinator.commitments_for(i)))
    survivors, dropped = coordinator.unmask_request()
    for i in survivors:
        coordinator.add_unmask(i, clients[i].unmask(survivors, dropped))   # every share verifies
    with pytest.raises(SecAggError, match="org-4 dealt an inconsistent sharing"):
        coordinator.finish()


def test_a_holder_refuses_shares_that_do_not_match_their_dealer_s_commitments():
    """Otherwise a dealer could publish one commitment and seal another share, and the honest
    holder would be blamed at unmask: the holder checks first and names the dealer."""
    session = _session(4, 10, threshold=3)
    clients = {i: MaskingClient(session, i) for i in session.participants}
    roster = {i: c.advertise() for i, c in clients.items()}
    dealt = {i: c.share_keys(roster) for i, c in clients.items()}
    sealed = {j: dealt[j].sealed[1] for j in (2, 3, 4)}
    commitments = {j: dealt[j].share_commitments[1] for j in (2, 3, 4)}
    commitments[3] = (commitments[3][0], bytes(32))
    with pytest.raises(SecAggError, match="the shares 3 dealt to this organization do not match the commitments 3"):
        clients[1].mask(sealed, np.zeros(10, np.float32), 1, commitments)


@pytest.mark.parametrize("slot,named", [("value", "masked values outside its slot"),
                                         ("weight", "masked a weight outside its slot")])
def test_the_unmasked_sum_must_be_one_honest_inputs_can_make(slot, named):
    """An organization can put any ring element in its slots: a value far beyond the clip,
    a weight above W. The coordinator never sees one input, but a sum that no honest inputs
    can make is refused (nobody can be named: that would take zero-knowledge proofs)."""
    session = _session(5, 64, threshold=3)
    updates, weights = _updates(5, 64)
    clients = {i: MaskingClient(session, i) for i in session.participants}
    coordinator = SecAggCoordinator(session)
    for i, c in clients.items():
        coordinator.add_keys(i, c.advertise())
    roster = coordinator.roster()
    for i in roster:
        coordinator.add_shares(i, clients[i].share_keys(roster))
    for i, sealed in coordinator.routing().items():
        masked = clients[i].mask(sealed, updates[i - 1], int(weights[i - 1]))
        if i == 2:   # org 2 adds to its own slots after masking: the masks still cancel
            if slot == "value":
                masked[:5] += np.uint32(1 << 30)
            else:
                masked[-1] += np.uint32(5 * MAX_WEIGHT)
        coordinator.add_masked(i, masked)
    survivors, dropped = coordinator.unmask_request()
    for i in survivors:
        coordinator.add_unmask(i, clients[i].unmask(survivors, dropped))
    with pytest.raises(SecAggError, match=named):
        coordinator.finish()


# ---- building blocks ---------------------------------------------------------
@pytest.mark.parametrize("name", prg.PRGS)
def test_prg_is_deterministic_and_chunking_does_not_matter(name):
    seed, other = os.urandom(32), os.urandom(32)
    a = prg.expand(seed, 10_001, np.uint32, prg=name)
    assert np.array_equal(a, prg.expand(seed, 10_001, np.uint32, prg=name))
    assert not np.array_equal(a, prg.expand(other, 10_001, np.uint32, prg=name))
    for chunk in (1, 7, 4096, 1 << 16):
        v = np.zeros(10_001, np.uint32)
        prg.apply_masks(v, [(seed, 1)], 32, name, chunk=chunk)
        assert np.array_equal(v, a)
    v = np.arange(10_001, dtype=np.uint64)
    prg.apply_masks(v, [(seed, 1), (other, 1), (seed, -1), (other, -1)], 40, name, chunk=333)
    assert np.array_equal(v, np.arange(10_001, dtype=np.uint64))
    assert _chi_square_uniform_bytes(prg.expand(seed, 1 << 16, np.uint32, prg=name)) < 255 + 6 * 22.6


def test_prgs_differ_and_ring_reduction_is_uniform():
    seed = os.urandom(32)
    streams = [prg.expand(seed, 1000, np.uint32, prg=p) for p in prg.PRGS]
    assert len({s.tobytes() for s in streams}) == len(prg.PRGS)
    low = prg.expand(seed, 1 << 16, np.uint32, ring_bits=20)
    assert low.max() < 2**20 and low.max() > 2**20 - 2**10


@pytest.mark.parametrize("n,t", [(5, 3), (10, 6), (31, 16)])
def test_shamir_any_t_shares_reconstruct(n, t):
    secret = os.urandom(32)
    shares = shamir.split(secret, t, list(range(1, n + 1)))
    rng = np.random.default_rng(n)
    for _ in range(5):
        pick = sorted(int(i) for i in rng.choice(range(1, n + 1), t, replace=False))
        assert shamir.combine({i: shares[i] for i in pick}, t) == secret
    with pytest.raises(ThresholdError):
        shamir.combine({i: shares[i] for i in range(1, t)}, t)
    # one forged share: detected (the value is no 32-byte secret), or at least not the secret
    forged = {**{i: shares[i] for i in range(1, t + 1)}, 1: os.urandom(shamir.SHARE_BYTES)}
    try:
        assert shamir.combine(forged, t) != secret
    except SecAggError as err:
        assert "inconsistent" in str(err)


def test_ring_is_the_finest_that_cannot_wrap():
    for n in (2, 10, 100, 1000):
        ring = RingSpec.derive(n, CLIP, MAX_WEIGHT)
        assert ring.ring_bits == 32 and ring.dtype == np.uint32
        limit = 2**31 - 1
        q = int(np.rint(CLIP * 2.0**ring.frac_bits))
        assert n * q <= limit < n * int(np.rint(CLIP * 2.0 ** (ring.frac_bits + 1)))
        # the worst case: n inputs all at the clip bound with the largest weight, either sign
        for sign in (1, -1):
            one = ring.quantize(np.full(4, sign * 10 * CLIP), MAX_WEIGHT)
            total = np.zeros(4, np.uint32)
            for _ in range(n):
                total += one
            assert np.allclose(ring.dequantize_mean(total, n * MAX_WEIGHT), sign * CLIP, atol=ring.step)
    given = RingSpec.derive(100, CLIP, MAX_WEIGHT, frac_bits=40)  # 100 · 0.05 · 2^40 ≈ 2^42.3: 43 bits + sign
    assert given.ring_bits == 44 and given.dtype == np.uint64
    with pytest.raises(SecAggError, match="wrap"):
        RingSpec(32, 40, CLIP, MAX_WEIGHT, 100).validate()
    with pytest.raises(SecAggError, match="NaN"):
        given.quantize(np.array([np.nan]), 1)
    with pytest.raises(SecAggError, match="weight"):
        given.quantize(np.zeros(2), MAX_WEIGHT + 1)


def test_flat_layout_round_trip():
    rng = np.random.default_rng(1)
    tensors = {"b": rng.normal(size=(3, 2)).astype(np.float32), "a": rng.normal(size=(5,)).astype(np.float32)}
    layout = layout_of(tensors)
    assert [name for name, _ in layout] == ["a", "b"]
    back = unflatten(flatten(tensors, layout), layout)
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)


def test_a_correction_is_uniform_and_only_taken_when_asked():
    n = 6
    session = _session(n, 20_000, threshold=4)
    updates, weights = _updates(n, session.length)
    clients, coordinator = _masked(session, updates, weights, drop_before_masked={6})
    survivors, dropped = coordinator.unmask_request()
    assert dropped == [6] and coordinator.asks_corrections
    answer = clients[1].unmask(survivors, dropped, correction=True)
    assert answer.correction is not None and _chi_square_uniform_bytes(answer.correction) < 255 + 6 * 22.6
    coordinator.add_unmask(1, answer)
    quiet = SecAggCoordinator(_session(2, 10, threshold=2))
    assert not quiet.asks_corrections   # no dropout: nothing to correct
