"""FedProx, FedAvgM and the FedOpt family against hand-written oracles;
arrival order and resume (state round trip) properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from strategies import STRATEGIES, build_strategy
from strategies.fedavg import FedAvg
from strategies.fedavgm import FedAvgM
from strategies.fedprox import FedProx

SHAPES = {"m.q_proj.lora_A.weight": (3, 6), "m.q_proj.lora_B.weight": (5, 3)}


def adapter(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def round_updates(rng: np.random.Generator, global_: dict[str, np.ndarray], n: int = 4):
    """Updates near the global, with example counts."""
    return [
        ({k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in global_.items()},
         int(rng.integers(1, 50)))
        for _ in range(n)
    ]


def run_round(strategy, server_round, global_, updates):
    strategy.begin_round(server_round, global_)
    for update, n in updates:
        strategy.accumulate(update, n)
    return strategy.finish_round()


def weighted_mean(updates, key):
    values = np.stack([u[key] for u, _ in updates]).astype(np.float64)
    return np.average(values, axis=0, weights=[n for _, n in updates])


def test_fedprox_aggregates_exactly_as_fedavg_and_sends_mu() -> None:
    rng = np.random.default_rng(0)
    global_ = adapter(rng)
    updates = round_updates(rng, global_)
    prox = FedProx(mu=0.3)
    assert prox.configure_train(1) == {"proximal-mu": 0.3}
    assert FedProx().configure_train(1) == {"proximal-mu": 0.01}
    got, ref = run_round(prox, 1, global_, updates), run_round(FedAvg(), 1, global_, updates)
    for key in SHAPES:
        assert np.array_equal(got[key], ref[key])
    with pytest.raises(ValueError, match="'mu'"):
        FedProx(mu=-0.1)


def test_fedavgm_matches_momentum_oracle_over_rounds() -> None:
    rng = np.random.default_rng(1)
    lr, beta = 0.7, 0.9
    strategy = FedAvgM(server_learning_rate=lr, server_momentum=beta)
    global_ = adapter(rng)
    oracle = {k: v.astype(np.float64) for k, v in global_.items()}
    velocity = {k: np.zeros(s) for k, s in SHAPES.items()}
    for server_round in (1, 2, 3):
        updates = round_updates(rng, global_)
        global_ = run_round(strategy, server_round, global_, updates)
        for key in SHAPES:
            velocity[key] = beta * velocity[key] + (weighted_mean(updates, key) - oracle[key])
            oracle[key] = (oracle[key] + lr * velocity[key]).astype(np.float32).astype(np.float64)
            np.testing.assert_allclose(global_[key], oracle[key], rtol=1e-5, atol=1e-6)


def test_fedavgm_without_momentum_is_fedavg() -> None:
    rng = np.random.default_rng(2)
    global_ = adapter(rng)
    updates = round_updates(rng, global_)
    got = run_round(FedAvgM(server_learning_rate=1.0, server_momentum=0.0), 1, global_, updates)
    ref = run_round(FedAvg(), 1, global_, updates)
    for key in SHAPES:
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-7)


def fedopt_oracle(kind: str, params: dict, rounds: list[tuple[dict, list]]):
    """Reddi et al. Algorithm 2 as Flower writes it, written straight from the paper."""
    eta, tau = params["eta"], params["tau"]
    b1 = params.get("beta_1", 0.0)
    b2 = params.get("beta_2", 0.0)
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.zeros(s) for k, s in SHAPES.items()}
    results = []
    for t, (global_, updates) in enumerate(rounds, start=1):
        new = {}
        for key in SHAPES:
            x = global_[key].astype(np.float64)
            delta = weighted_mean(updates, key).astype(np.float32).astype(np.float64) - x
            m[key] = b1 * m[key] + (1 - b1) * delta
            if kind == "fedadam":
                v[key] = b2 * v[key] + (1 - b2) * delta**2
                step = eta * np.sqrt(1 - b2**t) / (1 - b1**t)
            elif kind == "fedyogi":
                v[key] = v[key] - (1 - b2) * delta**2 * np.sign(v[key] - delta**2)
                step = eta
            else:
                v[key] = v[key] + delta**2
                step = eta
            new[key] = (x + step * m[key] / (np.sqrt(v[key]) + tau)).astype(np.float32)
        results.append(new)
    return results


FEDOPT_CASES = [
    ("fedadam", {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    ("fedyogi", {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    ("fedadagrad", {"eta": 0.1, "tau": 1e-3}),
    ("fedadam", {"eta": 0.05, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-2}),
]


@pytest.mark.parametrize("kind,params", FEDOPT_CASES)
def test_fedopt_matches_hand_written_loop(kind: str, params: dict) -> None:
    rng = np.random.default_rng(3)
    strategy = build_strategy(kind, params)
    global_ = adapter(rng)
    rounds, results = [], []
    for server_round in (1, 2, 3):
        updates = round_updates(rng, global_)
        rounds.append((global_, updates))
        global_ = run_round(strategy, server_round, global_, updates)
        results.append(global_)
    for got, want in zip(results, fedopt_oracle(kind, params, rounds)):
        for key in SHAPES:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_fedopt_defaults_follow_flower() -> None:
    adam, yogi, adagrad = build_strategy("fedadam"), build_strategy("fedyogi"), build_strategy("fedadagrad")
    assert (adam.eta, adam.beta_1, adam.beta_2, adam.tau) == (0.1, 0.9, 0.99, 1e-3)
    assert (yogi.eta, yogi.beta_1, yogi.beta_2, yogi.tau) == (0.01, 0.9, 0.99, 1e-3)
    assert (adagrad.eta, adagrad.beta_1, adagrad.tau) == (0.1, 0.0, 1e-3)


@pytest.mark.parametrize("name", [name for name, cls in STRATEGIES.items() if cls.family == "classic"])
def test_arrival_order_does_not_change_a_bit(name: str) -> None:
    rng = np.random.default_rng(4)
    global_ = adapter(rng)
    updates = round_updates(rng, global_, n=5)
    results = [
        run_round(build_strategy(name), 1, global_, list(order))
        for order in itertools.islice(itertools.permutations(updates), 0, 120, 17)
    ]
    for other in results[1:]:
        for key in SHAPES:
            assert np.array_equal(results[0][key], other[key])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_resume_between_rounds_is_bit_identical(name: str) -> None:
    rng = np.random.default_rng(5)
    global_ = adapter(rng)
    rounds = []
    for _ in range(4):
        rounds.append(round_updates(rng, global_))
    # the updates depend only on the round, so both runs see the same replies
    uninterrupted = build_strategy(name)
    g_a = global_
    for r, updates in enumerate(rounds, start=1):
        g_a = run_round(uninterrupted, r, g_a, updates)

    first = build_strategy(name)
    g_b = global_
    for r, updates in enumerate(rounds[:2], start=1):
        g_b = run_round(first, r, g_b, updates)
    # through the checkpoint's own format: safetensors bytes
    state = st_load(st_save(first.state_dict()))
    assert state, "a stateful strategy must save something after a round"
    resumed = build_strategy(name)
    resumed.load_state_dict(state)
    for r, updates in enumerate(rounds[2:], start=3):
        g_b = run_round(resumed, r, g_b, updates)
    for key in SHAPES:
        assert np.array_equal(g_a[key], g_b[key])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_fresh_state_and_bad_state(name: str) -> None:
    strategy = build_strategy(name)
    assert strategy.state_dict() == {}
    strategy.load_state_dict({})
    with pytest.raises(ValueError):
        strategy.load_state_dict({"nonsense": np.zeros(1)})
    # a state for other tensors is refused when the round starts
    other = build_strategy(name)
    rng = np.random.default_rng(6)
    g = adapter(rng)
    run_round(other, 1, g, round_updates(rng, g))
    renamed = {k.replace("q_proj", "k_proj"): v for k, v in other.state_dict().items()}
    strategy.load_state_dict(renamed)
    with pytest.raises(ValueError, match="state"):
        strategy.begin_round(2, g)


@pytest.mark.parametrize("name", ["fedprox", "fedavgm", "fedadam"])
def test_wrong_shapes_are_refused(name: str) -> None:
    rng = np.random.default_rng(7)
    strategy = build_strategy(name)
    g = adapter(rng)
    strategy.begin_round(1, g)
    bad = dict(g)
    bad["m.q_proj.lora_A.weight"] = np.zeros((1, 6), np.float32)  # would broadcast silently
    with pytest.raises(ValueError, match="shape"):
        strategy.accumulate(bad, 3)
