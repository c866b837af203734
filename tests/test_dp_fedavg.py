"""DP-FedAvg: clipping, fixed denominator, noise scale, noise state, the secure-sum hook."""

from __future__ import annotations

import numpy as np
import pytest

from server.checkpoint import serialize_tensors
from strategies import AggregationError, build_strategy
from strategies.dp_fedavg import DpFedAvg, PrivacyStep, PrivateStrategy


def _global(shape=(4, 8)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"a.lora_A": rng.standard_normal(shape).astype(np.float32),
            "a.lora_B": rng.standard_normal(shape[::-1]).astype(np.float32)}


def _with_delta(base: dict[str, np.ndarray], norm: float, seed: int) -> tuple[dict, dict]:
    """An update whose delta over the whole adapter has the given L2 norm, and that delta."""
    rng = np.random.default_rng(seed)
    raw = {k: rng.standard_normal(v.shape) for k, v in base.items()}
    scale = norm / np.sqrt(sum(float(np.vdot(d, d)) for d in raw.values()))
    delta = {k: (d * scale).astype(np.float32) for k, d in raw.items()}
    return {k: base[k] + delta[k] for k in base}, delta


def test_it_is_registered_and_private() -> None:
    strategy = build_strategy("dp-fedavg", {"clip_norm": 0.5, "noise_multiplier": 1.2, "noise_placement": "local"})
    assert isinstance(strategy, DpFedAvg) and isinstance(strategy, PrivateStrategy)
    assert strategy.configure_train(3) == {"dp-clip": 0.5, "dp-noise": 1.2}
    assert build_strategy("dp-fedavg").configure_train(1) == {}
    assert not isinstance(build_strategy("fedavg"), PrivateStrategy)


def test_sampling_rate_and_denominator() -> None:
    central = DpFedAvg(clip_norm=2.0, noise_multiplier=0.5)
    assert central.plan_round(3, 12) == PrivacyStep(q=0.25, noise_multiplier=0.5)
    assert central.noise_std == 0.5 * 2.0 / 3
    # local: the coordinator sees who took part, no amplification by sampling
    assert DpFedAvg(noise_placement="local").plan_round(3, 12).q == 1.0
    with pytest.raises(ValueError):
        central.plan_round(5, 4)
    with pytest.raises(AggregationError, match="plan_round"):
        DpFedAvg().begin_round(1, _global())


def test_each_delta_is_clipped_and_the_denominator_is_the_expected_count() -> None:
    base = _global()
    strategy = DpFedAvg(clip_norm=1.0, noise_multiplier=0.0, noise_seed=0)
    strategy.plan_round(4, 4)   # 4 sampled; one never replies
    strategy.begin_round(1, base)
    deltas = []
    for norm, seed, n in [(0.5, 1, 10), (2.0, 2, 1), (10.0, 3, 1000)]:
        update, delta = _with_delta(base, norm, seed)
        strategy.accumulate(update, n)  # example counts are ignored: uniform weights
        deltas.append({k: d.astype(np.float64) * min(1.0, 1.0 / norm) for k, d in delta.items()})
    assert strategy.clipped == 2
    result = strategy.finish_round()
    for key in base:
        expected = base[key] + sum(d[key] for d in deltas) / 4
        np.testing.assert_allclose(result[key], expected, atol=2e-6)
    # no single organization moves the global by more than C/m
    strategy.plan_round(4, 4)
    strategy.begin_round(2, base)
    strategy.accumulate(_with_delta(base, 1e6, 4)[0], 1)
    moved = strategy.finish_round()
    step = np.sqrt(sum(float(np.vdot(moved[k] - base[k], moved[k] - base[k])) for k in base))
    assert step == pytest.approx(1.0 / 4, rel=1e-5)


def test_more_contributions_than_sampled_are_refused() -> None:
    base = _global()
    strategy = DpFedAvg(noise_seed=0)
    strategy.plan_round(1, 3)
    strategy.begin_round(1, base)
    strategy.accumulate(base, 1)
    with pytest.raises(AggregationError, match="more than the 1 sampled"):
        strategy.accumulate(base, 1)


def test_noise_has_the_stated_standard_deviation() -> None:
    """N(0, (zC/m)²) per coordinate, once: a fixed seed, 2·10⁵ coordinates."""
    base = {"w.lora_A": np.zeros((400, 250), np.float32), "w.lora_B": np.zeros((250, 400), np.float32)}
    z, clip, m = 1.3, 0.8, 5
    strategy = DpFedAvg(clip_norm=clip, noise_multiplier=z, noise_seed=123)
    strategy.plan_round(m, 20)
    strategy.begin_round(1, base)
    for _ in range(3):
        strategy.accumulate(base, 1)  # zero deltas: the result is pure noise
    noise = np.concatenate([v.ravel().astype(np.float64) for v in strategy.finish_round().values()])
    expected = z * clip / m
    n = noise.size
    # the sample std is within 4 standard errors (σ/√(2n)), the mean within 4σ/√n
    assert abs(noise.std() - expected) < 4 * expected / np.sqrt(2 * n)
    assert abs(noise.mean()) < 4 * expected / np.sqrt(n)
    kurtosis = float(np.mean((noise / noise.std()) ** 4))
    assert abs(kurtosis - 3.0) < 0.05  # Gaussian, not uniform or Laplace
    # local placement: the coordinator adds nothing and does not clip
    local = DpFedAvg(clip_norm=clip, noise_multiplier=z, noise_placement="local", noise_seed=123)
    local.plan_round(2, 20)
    local.begin_round(1, base)
    local.accumulate({k: v + 1.0 for k, v in base.items()}, 1)   # norm 447 ≫ C: already noised at the org
    assert all(np.all(v == 0.5) for v in local.finish_round().values())


def test_noise_state_round_trips_bit_exactly() -> None:
    """A strategy restored from the state after round 1 draws round 2's noise bit for bit."""
    base = _global((16, 32))
    update, _ = _with_delta(base, 3.0, 7)

    def one_round(strategy: DpFedAvg, server_round: int) -> dict[str, np.ndarray]:
        strategy.plan_round(3, 3)
        strategy.begin_round(server_round, base)
        strategy.accumulate(update, 1)
        return strategy.finish_round()

    original = DpFedAvg(clip_norm=1.0, noise_multiplier=1.0)   # secret OS-entropy seed
    one_round(original, 1)
    saved = original.state_dict()
    assert set(saved) == {"noise_rng_state"} and saved["noise_rng_state"].dtype == np.uint8
    serialize_tensors(saved, "strategy state")  # it fits a checkpoint's safetensors file
    restored = DpFedAvg(clip_norm=1.0, noise_multiplier=1.0)
    restored.load_state_dict({k: v.copy() for k, v in saved.items()})
    second, replayed = one_round(original, 2), one_round(restored, 2)
    assert all(second[k].tobytes() == replayed[k].tobytes() for k in base)
    # without the state, another instance's noise differs (its seed is its own secret)
    other = one_round(DpFedAvg(clip_norm=1.0, noise_multiplier=1.0), 2)
    assert any(other[k].tobytes() != second[k].tobytes() for k in base)
    with pytest.raises(ValueError, match="unexpected state keys"):
        restored.load_state_dict({"momentum/x": np.zeros(2)})


def test_the_secure_sum_hook_adds_the_noise_once() -> None:
    """What secure aggregation will deliver (the sum of organization-clipped deltas)
    gives the same global as the coordinator clipping the individual updates."""
    base = _global()
    pairs = [_with_delta(base, norm, seed) for norm, seed in [(0.3, 1), (0.9, 2), (0.6, 3)]]
    individual = DpFedAvg(clip_norm=1.0, noise_multiplier=1.0, noise_seed=5)
    individual.plan_round(3, 9)
    individual.begin_round(1, base)
    for update, _ in pairs:
        individual.accumulate(update, 1)
    summed = DpFedAvg(clip_norm=1.0, noise_multiplier=1.0, noise_seed=5)
    summed.plan_round(3, 9)
    summed.begin_round(1, base)
    summed.accumulate_secure_sum({k: sum(d[k] for _, d in pairs) for k in base}, 3)
    a, b = individual.finish_round(), summed.finish_round()
    for key in base:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)
    local = DpFedAvg(noise_placement="local")
    local.plan_round(1, 1)
    local.begin_round(1, base)
    with pytest.raises(AggregationError, match="noise_placement='server'"):
        local.accumulate_secure_sum(base, 1)
