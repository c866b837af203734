"""FedAvg against a numerical oracle; streaming, order and state properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from strategies import AggregationError, build_strategy
from strategies.fedavg import FedAvg

SHAPES = {"a.lora_A.weight": (3, 5), "a.lora_B.weight": (5, 3)}


def random_adapter(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def test_weighted_mean_matches_oracle() -> None:
    rng = np.random.default_rng(0)
    updates = [random_adapter(rng) for _ in range(4)]
    weights = [10, 1, 7, 2]
    strategy = FedAvg()
    strategy.begin_round(1, random_adapter(rng))
    for update, n in zip(updates, weights):
        strategy.accumulate(update, n)
    result = strategy.finish_round()
    for name in SHAPES:
        oracle = np.average(np.stack([u[name] for u in updates]).astype(np.float64), axis=0, weights=weights)
        np.testing.assert_allclose(result[name], oracle, rtol=1e-6, atol=1e-7)
        assert result[name].dtype == np.float32


def test_arrival_order_does_not_change_a_bit() -> None:
    rng = np.random.default_rng(1)
    updates = [(random_adapter(rng), int(rng.integers(1, 100))) for _ in range(5)]
    results = []
    for order in itertools.islice(itertools.permutations(updates), 0, 120, 7):
        strategy = FedAvg()
        strategy.begin_round(1, updates[0][0])
        for update, n in order:
            strategy.accumulate(update, n)
        results.append(strategy.finish_round())
    for other in results[1:]:
        for name in SHAPES:
            assert np.array_equal(results[0][name], other[name])


def test_no_update_is_an_error() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, random_adapter(np.random.default_rng(2)))
    with pytest.raises(AggregationError):
        strategy.finish_round()


def test_mismatched_update_is_refused() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, random_adapter(np.random.default_rng(3)))
    with pytest.raises(ValueError):
        strategy.accumulate({"other": np.zeros(1, np.float32)}, 1)
    with pytest.raises(ValueError):
        strategy.accumulate(random_adapter(np.random.default_rng(4)), 0)


def test_registry_lists_valid_choices() -> None:
    assert isinstance(build_strategy("FedAvg"), FedAvg)
    with pytest.raises(ValueError, match="valid: \\['fedavg'"):
        build_strategy("fedmagic")
    with pytest.raises(ValueError, match="no parameter"):
        build_strategy("fedavg", {"mu": 0.1})


def test_fedavg_keeps_no_state() -> None:
    assert FedAvg().state_dict() == {}
    with pytest.raises(ValueError):
        FedAvg().load_state_dict({"m": np.zeros(1)})
