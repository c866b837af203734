"""Median, trimmed mean, (Multi-)Krum and norm-bounded averaging against
straightforward oracles, under an attacker, and at their limits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from strategies import STRATEGIES, AggregationError, build_strategy
from strategies.krum import Krum

SHAPES = {
    "m.v_proj.lora_A.weight": (2, 7), "m.v_proj.lora_B.weight": (6, 2),
    "m.q_proj.lora_A.weight": (2, 5), "m.q_proj.lora_B.weight": (4, 2),
}


def adapter(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def near(rng, global_, spread=0.1):
    return {k: (v + spread * rng.normal(size=v.shape)).astype(np.float32) for k, v in global_.items()}


def run_round(strategy, global_, updates, weights=None):
    strategy.begin_round(1, global_)
    for i, update in enumerate(updates):
        strategy.accumulate(update, weights[i] if weights else 10)
    return strategy.finish_round()


def flat(update) -> np.ndarray:
    return np.concatenate([update[k].astype(np.float64).ravel() for k in SHAPES])


@pytest.mark.parametrize("n", [1, 4, 5])
def test_median_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(0)
    g = adapter(rng)
    updates = [near(rng, g) for _ in range(n)]
    got = run_round(build_strategy("median"), g, updates, weights=list(range(1, n + 1)))
    for key in SHAPES:
        want = np.median(np.stack([u[key] for u in updates]).astype(np.float64), axis=0)
        np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=1e-7)
        assert got[key].dtype == np.float32


@pytest.mark.parametrize("beta,n", [(0.0, 5), (0.2, 5), (0.2, 10), (0.4, 7), (0.49, 9)])
def test_trimmed_mean_matches_sorted_slicing(beta: float, n: int) -> None:
    rng = np.random.default_rng(1)
    g = adapter(rng)
    updates = [near(rng, g) for _ in range(n)]
    got = run_round(build_strategy("trimmed-mean", {"beta": beta}), g, updates)
    cut = int(beta * n)
    for key in SHAPES:
        values = np.sort(np.stack([u[key] for u in updates]).astype(np.float64), axis=0)
        np.testing.assert_allclose(got[key], values[cut : n - cut].mean(axis=0), rtol=1e-6, atol=1e-7)


def brute_force_krum(updates, weights, f, m):
    vecs = [flat(u) for u in updates]
    n = len(vecs)
    scores = []
    for i in range(n):
        dists = sorted(float(np.sum((vecs[i] - vecs[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dists[: n - f - 2]))
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    w = np.array([weights[i] for i in chosen], dtype=np.float64)
    return chosen, {k: np.average(np.stack([updates[i][k] for i in chosen]).astype(np.float64), axis=0, weights=w)
                    for k in SHAPES}


@pytest.mark.parametrize("f,m,n", [(0, 1, 3), (1, 1, 5), (1, 3, 6), (2, 2, 9)])
def test_krum_matches_brute_force(f: int, m: int, n: int) -> None:
    rng = np.random.default_rng(2)
    g = adapter(rng)
    # spreads differ so the scores are well separated
    updates = [near(rng, g, spread=0.05 * (i + 1)) for i in range(n)]
    weights = [int(w) for w in rng.integers(1, 30, size=n)]
    strategy = Krum(num_malicious=f, num_to_select=m)
    got = run_round(strategy, g, updates, weights)
    chosen, want = brute_force_krum(updates, weights, f, m)
    assert sorted(strategy.last_selected) == sorted(chosen)
    for key in SHAPES:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_robust_rules_resist_one_scaled_update_fedavg_does_not() -> None:
    rng = np.random.default_rng(3)
    g = adapter(rng)
    honest = [near(rng, g, spread=0.05) for _ in range(4)]
    attacker = {k: (100.0 * v).astype(np.float32) for k, v in near(rng, g, spread=0.05).items()}
    updates = honest[:2] + [attacker] + honest[2:]
    honest_mean = {k: np.mean([u[k] for u in honest], axis=0) for k in SHAPES}
    honest_spread = max(float(np.abs(u[k] - honest_mean[k]).max()) for u in honest for k in SHAPES)

    def distance(result):
        return max(float(np.abs(result[k] - honest_mean[k]).max()) for k in SHAPES)

    for name, params in (("median", {}), ("trimmed-mean", {"beta": 0.2}), ("krum", {"num_malicious": 1}),
                         ("krum", {"num_malicious": 1, "num_to_select": 3})):
        assert distance(run_round(build_strategy(name, params), g, updates)) <= honest_spread, name
    assert distance(run_round(build_strategy("fedavg"), g, updates)) > 10 * honest_spread


def test_norm_bounded_limits_the_attacker_and_matches_oracle() -> None:
    rng = np.random.default_rng(4)
    g = adapter(rng)
    updates = [near(rng, g, spread=0.01) for _ in range(4)] + [{k: (100 * v).astype(np.float32) for k, v in g.items()}]
    weights = [3, 5, 7, 11, 13]
    clip = 0.05
    strategy = build_strategy("norm-bounded", {"clip_norm": clip})
    got = run_round(strategy, g, updates, weights)
    assert strategy.clipped >= 1
    deltas = []
    for u in updates:
        d = flat(u) - flat(g)
        deltas.append(d * min(1.0, clip / np.linalg.norm(d)))
    want = flat(g) + np.average(np.stack(deltas), axis=0, weights=weights)
    np.testing.assert_allclose(flat(got), want, rtol=1e-6, atol=1e-6)
    # the attacker moves the global by at most clip · n_i / Σn
    assert np.linalg.norm(flat(got) - flat(g)) <= clip * 1.0001


def test_norm_bounded_streams_in_any_order() -> None:
    rng = np.random.default_rng(5)
    g = adapter(rng)
    pairs = [(near(rng, g, spread=0.1 * (i + 1)), i + 2) for i in range(5)]
    results = []
    for order in itertools.islice(itertools.permutations(pairs), 0, 120, 23):
        s = build_strategy("norm-bounded", {"clip_norm": 0.5})
        s.begin_round(1, g)
        for u, n in order:
            s.accumulate(u, n)
        results.append(s.finish_round())
    for other in results[1:]:
        for key in SHAPES:
            assert np.array_equal(results[0][key], other[key])


@pytest.mark.parametrize("name", [name for name, cls in STRATEGIES.items() if cls.needs_every_update])
def test_max_updates_is_enforced(name: str) -> None:
    rng = np.random.default_rng(6)
    g = adapter(rng)
    strategy = build_strategy(name, {"max_updates": 3})
    assert strategy.needs_every_update and strategy.max_updates == 3
    strategy.begin_round(1, g)
    for _ in range(3):
        strategy.accumulate(near(rng, g), 1)
    with pytest.raises(AggregationError, match="max_updates=3"):
        strategy.accumulate(near(rng, g), 1)


def test_krum_refuses_too_few_updates() -> None:
    rng = np.random.default_rng(7)
    g = adapter(rng)
    with pytest.raises(AggregationError, match="more than 4"):
        run_round(Krum(num_malicious=1), g, [near(rng, g) for _ in range(4)])
    with pytest.raises(AggregationError, match="num_to_select"):
        run_round(Krum(num_malicious=1, num_to_select=5), g, [near(rng, g) for _ in range(5)])
    # the round after a refusal starts clean
    s = Krum(num_malicious=1)
    with pytest.raises(AggregationError):
        run_round(s, g, [near(rng, g) for _ in range(3)])
    run_round(s, g, [near(rng, g) for _ in range(5)])


@pytest.mark.parametrize("name", [name for name, cls in STRATEGIES.items() if cls.family == "robust"])
def test_empty_round_and_bad_updates(name: str) -> None:
    rng = np.random.default_rng(8)
    g = adapter(rng)
    s = build_strategy(name)
    s.begin_round(1, g)
    with pytest.raises(AggregationError):
        s.finish_round()
    s.begin_round(1, g)
    with pytest.raises(ValueError):
        s.accumulate(near(rng, g), 0)
    bad = dict(near(rng, g))
    bad["m.v_proj.lora_A.weight"] = np.zeros((1, 7), np.float32)
    with pytest.raises(ValueError, match="shape"):
        s.accumulate(bad, 1)


def test_kept_updates_are_private_copies() -> None:
    rng = np.random.default_rng(9)
    g = adapter(rng)
    s = build_strategy("median")
    s.begin_round(1, g)
    u = near(rng, g)
    s.accumulate(u, 1)
    before = {k: v.copy() for k, v in u.items()}
    for v in u.values():
        v[...] = 1e9  # the coordinator reuses or drops its buffers
    got = s.finish_round()
    for k in SHAPES:
        assert np.array_equal(got[k], before[k])
