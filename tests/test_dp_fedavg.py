"""DP-FedAvg: clipping, fixed denominator, noise scale, noise from (key, round), the secure-sum hook."""

from __future__ import annotations

import numpy as np
import pytest

from server.checkpoint import serialize_tensors
from strategies import AggregationError, build_strategy
from strategies.dp_fedavg import (
    NOISE_KEY_BYTES,
    DpFedAvg,
    PrivacyStep,
    PrivateStrategy,
    new_noise_key,
    noise_key_fingerprint,
    noise_key_from_seed,
    round_noise_generator,
)


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


def test_the_noise_is_a_function_of_the_key_and_the_round_and_nothing_is_saved() -> None:
    """Round k's noise comes from (key, k) alone: the checkpointed state is empty, a strategy
    holding the same key draws round 2's noise bit for bit, and another key draws other noise."""
    base = _global((16, 32))
    update, _ = _with_delta(base, 3.0, 7)

    def one_round(strategy: DpFedAvg, server_round: int) -> dict[str, np.ndarray]:
        strategy.plan_round(3, 3)
        strategy.begin_round(server_round, base)
        strategy.accumulate(update, 1)
        return strategy.finish_round()

    original = DpFedAvg(clip_norm=1.0, noise_multiplier=1.0)   # a random secret key of its own
    assert original.noise_key_source == "secret"
    first = one_round(original, 1)
    saved = original.state_dict()
    assert saved == {}          # nothing of the noise goes into a checkpoint
    serialize_tensors(saved, "strategy state")
    key = original._noise_key
    assert len(key) == NOISE_KEY_BYTES and original.noise_key_fingerprint == noise_key_fingerprint(key)
    assert key.hex() not in original.noise_key_fingerprint
    restored = DpFedAvg(clip_norm=1.0, noise_multiplier=1.0)
    restored.load_state_dict({})
    restored.set_noise_key(key)   # what the coordinator does on resume (server/privacy.py)
    second, replayed = one_round(original, 2), one_round(restored, 2)
    assert all(second[k].tobytes() == replayed[k].tobytes() for k in base)
    # the round is part of the derivation: round 1 is not round 2 again
    assert any(first[k].tobytes() != second[k].tobytes() for k in base)
    # without the key, another instance's noise differs (its key is its own secret)
    other = one_round(DpFedAvg(clip_norm=1.0, noise_multiplier=1.0), 2)
    assert any(other[k].tobytes() != second[k].tobytes() for k in base)
    with pytest.raises(ValueError, match="unexpected state keys"):
        restored.load_state_dict({"momentum/x": np.zeros(2)})
    # a checkpoint from before issue 11 carried the generator state: refused by name
    with pytest.raises(ValueError, match="holds the noise generator's state"):
        restored.load_state_dict({"noise_rng_state": np.zeros(8, np.uint8)})
    with pytest.raises(ValueError, match="32 bytes"):
        restored.set_noise_key(b"short")


def test_noise_seed_gives_a_reproducible_key_that_is_not_private() -> None:
    a, b = DpFedAvg(noise_seed=7), DpFedAvg(noise_seed=7)
    assert a.noise_key_source == "noise_seed" and a.noise_key_fingerprint == b.noise_key_fingerprint
    assert a._noise_key == noise_key_from_seed(7) != noise_key_from_seed(8)
    with pytest.raises(ValueError, match="noise_seed=7 sets the noise"):
        a.set_noise_key(new_noise_key())
    assert DpFedAvg().noise_key_fingerprint != DpFedAvg().noise_key_fingerprint   # fresh random keys


def test_the_round_noise_derivation_is_pinned() -> None:
    """A resumed coordinator must draw the noise an older run of this version drew: the
    derivation (HMAC-SHA256 → Philox → ziggurat) is pinned, bit for bit."""
    draws = round_noise_generator(bytes(range(32)), 3).standard_normal(3).tolist()
    assert draws == [0.7317291538324221, 0.4972186843147048, -0.947525499486017]
    assert noise_key_fingerprint(bytes(range(32))) == "sha256:a509163e29a2b23bf5ec61c87a5855ae"
    assert noise_key_from_seed(7).hex() == "1ba831d9549c9d808f8b203c24a6c2005f699c8bb582d4e240176b4f4f790b9d"
    with pytest.raises(ValueError):
        round_noise_generator(b"x" * 16, 1)


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
