"""LoRA-specific strategies and algebra: exact aggregation of B·A (with the
error-feedback residual), heterogeneous ranks (HetLoRA, FlexLoRA), and the
partial-sharing plans (FFA-LoRA, FedSA-LoRA), each against explicit
products formed here, in the test only."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from strategies import STRATEGIES, build_strategy
from strategies.lora_math import pad_adapter
from strategies.lora_rank import adapter_rank, lora_pairs, svd_reduce, truncate_adapter

# two modules with different shapes: (out, in)
MODULES = {"base_model.model.layers.0.self_attn.q_proj": (9, 12), "base_model.model.layers.0.self_attn.v_proj": (7, 12)}


def a_key(prefix: str) -> str:
    return f"{prefix}.lora_A.weight"


def b_key(prefix: str) -> str:
    return f"{prefix}.lora_B.weight"


def make(rank: int, rng: np.random.Generator, modules=MODULES) -> dict[str, np.ndarray]:
    out = {}
    for prefix, (o, i) in modules.items():
        out[a_key(prefix)] = rng.normal(size=(rank, i)).astype(np.float32)
        out[b_key(prefix)] = rng.normal(size=(o, rank)).astype(np.float32)
    return out


def product(adapter, prefix) -> np.ndarray:
    return adapter[b_key(prefix)].astype(np.float64) @ adapter[a_key(prefix)].astype(np.float64)


def best_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def run_round(strategy, server_round, global_, updates):
    strategy.begin_round(server_round, global_)
    for update, n in updates:
        strategy.accumulate(update, n)
    return strategy.finish_round()


# ---- lora_rank, lora_math -----------------------------------------------------

def test_truncate_and_pad_shapes_for_ranks_4_8_16() -> None:
    rng = np.random.default_rng(0)
    full = make(16, rng)
    for rank in (4, 8, 16):
        small = truncate_adapter(full, rank)
        assert adapter_rank(small) == rank
        for prefix, (o, i) in MODULES.items():
            assert small[a_key(prefix)].shape == (rank, i) and small[b_key(prefix)].shape == (o, rank)
            assert np.array_equal(small[a_key(prefix)], full[a_key(prefix)][:rank])
        padded = pad_adapter(small, 16)
        assert all(padded[k].shape == full[k].shape for k in full)
        for prefix in MODULES:
            assert not padded[a_key(prefix)][rank:].any() and not padded[b_key(prefix)][:, rank:].any()
        assert all(np.array_equal(truncate_adapter(padded, rank)[k], small[k]) for k in full)
    with pytest.raises(ValueError):
        truncate_adapter(full, 17)
    with pytest.raises(ValueError):
        pad_adapter(full, 8)
    with pytest.raises(ValueError):
        truncate_adapter(full, 0)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_svd_reduce_is_the_explicit_best_approximation(rank: int) -> None:
    rng = np.random.default_rng(1)
    full = make(16, rng)
    small = svd_reduce(full, rank)
    assert adapter_rank(small) == rank
    for prefix in MODULES:
        want = best_rank(product(full, prefix), rank)
        np.testing.assert_allclose(product(small, prefix), want, rtol=1e-4, atol=1e-4)
        # balanced: column k of B and row k of A have the same norm, √σ_k
        np.testing.assert_allclose(np.linalg.norm(small[b_key(prefix)], axis=0),
                                   np.linalg.norm(small[a_key(prefix)], axis=1), rtol=1e-4)
    scaled = svd_reduce(full, rank, scale=0.25)
    for prefix in MODULES:
        np.testing.assert_allclose(product(scaled, prefix), 0.25 * product(small, prefix), rtol=1e-4, atol=1e-5)


def test_zero_directions_stay_trainable() -> None:
    # a fresh adapter: B = 0. Re-factoring keeps the product 0 but A nonzero, as LoRA's init.
    rng = np.random.default_rng(2)
    fresh = make(4, rng)
    for prefix in MODULES:
        fresh[b_key(prefix)][...] = 0.0
    reduced = svd_reduce(fresh, 2)
    for prefix in MODULES:
        assert not reduced[b_key(prefix)].any()
        np.testing.assert_allclose(np.linalg.norm(reduced[a_key(prefix)], axis=1), 1.0, rtol=1e-5)


# ---- exact-lora --------------------------------------------------------------

def client_updates(rng, global_, n, spread=0.3):
    return [
        ({k: (v + spread * rng.normal(size=v.shape)).astype(np.float32) for k, v in global_.items()},
         int(rng.integers(1, 40)))
        for _ in range(n)
    ]


def exact_mean(updates, prefix):
    total = sum(n for _, n in updates)
    return sum(n * product(u, prefix) for u, n in updates) / total


def test_exact_lora_is_the_truncated_svd_of_the_mean_product() -> None:
    rng = np.random.default_rng(3)
    global_ = make(3, rng)
    updates = client_updates(rng, global_, 4)
    result = run_round(build_strategy("exact-lora"), 1, global_, updates)
    assert all(result[k].shape == global_[k].shape and result[k].dtype == np.float32 for k in global_)
    for prefix in MODULES:
        np.testing.assert_allclose(product(result, prefix), best_rank(exact_mean(updates, prefix), 3),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(result[b_key(prefix)], axis=0),
                                   np.linalg.norm(result[a_key(prefix)], axis=1), rtol=1e-5)


def test_exact_lora_beats_fedavg_on_the_product() -> None:
    rng = np.random.default_rng(4)
    global_ = make(2, rng)
    updates = client_updates(rng, global_, 5, spread=1.0)
    exact = run_round(build_strategy("exact-lora"), 1, global_, updates)
    naive = run_round(build_strategy("fedavg"), 1, global_, updates)
    for prefix in MODULES:
        target = exact_mean(updates, prefix)
        assert np.linalg.norm(product(exact, prefix) - target) < np.linalg.norm(product(naive, prefix) - target)


def test_exact_lora_order_does_not_matter() -> None:
    rng = np.random.default_rng(5)
    global_ = make(3, rng)
    updates = client_updates(rng, global_, 4)
    results = [run_round(build_strategy("exact-lora"), 1, global_, list(order))
               for order in itertools.islice(itertools.permutations(updates), 0, 24, 5)]
    for other in results[1:]:
        for prefix in MODULES:
            np.testing.assert_allclose(product(other, prefix), product(results[0], prefix), rtol=1e-5, atol=1e-5)


def residual_product(state, prefix) -> np.ndarray:
    key = f"residual/{prefix}"
    if f"{key}.lora_B" not in state:
        return 0.0
    return state[f"{key}.lora_B"] @ state[f"{key}.lora_A"]


def test_exact_lora_residual_loses_nothing_over_rounds() -> None:
    """Σ applied changes + final residual = Σ exact mean changes (error feedback)."""
    rng = np.random.default_rng(6)
    strategy = build_strategy("exact-lora", {"residual": True})
    global_ = make(2, rng)
    applied = {p: 0.0 for p in MODULES}
    exact = {p: 0.0 for p in MODULES}
    for server_round in (1, 2, 3):
        updates = client_updates(rng, global_, 4, spread=0.5)
        new = run_round(strategy, server_round, global_, updates)
        for p in MODULES:
            applied[p] = applied[p] + product(new, p) - product(global_, p)
            exact[p] = exact[p] + exact_mean(updates, p) - product(global_, p)
        global_ = new
    state = strategy.state_dict()
    assert state and all(v.dtype == np.float64 for v in state.values())
    for p in MODULES:
        tail = residual_product(state, p)
        assert np.linalg.norm(tail) > 1e-2  # truncation did drop something, and it was kept
        np.testing.assert_allclose(applied[p] + tail, exact[p], rtol=1e-5, atol=1e-5)


def test_exact_lora_residual_resume_is_bit_identical() -> None:
    rng = np.random.default_rng(7)
    g0 = make(2, rng)
    rounds = [client_updates(rng, g0, 3, spread=0.5) for _ in range(3)]
    a = build_strategy("exact-lora", {"residual": True})
    g_a = g0
    for r, updates in enumerate(rounds, start=1):
        g_a = run_round(a, r, g_a, updates)
    b = build_strategy("exact-lora", {"residual": True})
    g_b = g0
    for r, updates in enumerate(rounds[:2], start=1):
        g_b = run_round(b, r, g_b, updates)
    resumed = build_strategy("exact-lora", {"residual": True})
    resumed.load_state_dict(st_load(st_save(b.state_dict())))
    g_b = run_round(resumed, 3, g_b, rounds[2])
    assert all(np.array_equal(g_a[k], g_b[k]) for k in g0)
    assert all(np.array_equal(a.state_dict()[k], resumed.state_dict()[k]) for k in a.state_dict())


def test_exact_lora_state_rules() -> None:
    plain = build_strategy("exact-lora")
    assert plain.state_dict() == {}
    with pytest.raises(ValueError, match="residual"):
        plain.load_state_dict({"residual/x.lora_B": np.zeros((3, 1)), "residual/x.lora_A": np.zeros((1, 4))})
    with pytest.raises(ValueError):
        build_strategy("exact-lora", {"residual": True}).load_state_dict({"residual/x.lora_B": np.zeros((3, 1))})


def test_exact_lora_refuses_other_ranks() -> None:
    rng = np.random.default_rng(8)
    s = build_strategy("exact-lora")
    s.begin_round(1, make(4, rng))
    with pytest.raises(ValueError, match="shape"):
        s.accumulate(make(2, rng), 1)


# ---- heterogeneous ranks ----------------------------------------------------

RANKS = (4, 8, 16, 8)


def het_updates(rng, strategy, global_, spread=0.2):
    updates = []
    for rank in RANKS:
        start = strategy.adapter_for_rank(global_, rank)
        assert adapter_rank(start) == rank
        updates.append(({k: (v + spread * rng.normal(size=v.shape)).astype(np.float32) for k, v in start.items()},
                        int(rng.integers(1, 40))))
    return updates


def test_hetlora_pads_and_averages_factors() -> None:
    rng = np.random.default_rng(9)
    strategy = build_strategy("hetlora")
    assert strategy.rank_reduction == "truncate" and strategy.supports_heterogeneous_ranks
    global_ = make(16, rng)
    for rank in (4, 8, 16):
        start = strategy.adapter_for_rank(global_, rank)
        assert all(np.array_equal(start[k], truncate_adapter(global_, rank)[k]) for k in global_)
    updates = het_updates(rng, strategy, global_)
    result = run_round(strategy, 1, global_, updates)
    weights = [n for _, n in updates]
    for key, value in global_.items():
        padded = [pad_adapter(u, 16)[key].astype(np.float64) for u, _ in updates]
        want = np.average(np.stack(padded), axis=0, weights=weights)
        np.testing.assert_allclose(result[key], want, rtol=1e-6, atol=1e-6)
        assert result[key].shape == value.shape
    # streaming: any order, the same bits
    again = run_round(build_strategy("hetlora"), 1, global_, updates[::-1])
    assert all(np.array_equal(result[k], again[k]) for k in global_)
    strategy.begin_round(2, global_)
    with pytest.raises(ValueError, match="above the global rank"):
        strategy.accumulate(make(32, rng), 1)
    with pytest.raises(ValueError):
        strategy.adapter_for_rank(global_, 32)


def test_flexlora_averages_full_products_and_svd_reduces_the_downlink() -> None:
    rng = np.random.default_rng(10)
    strategy = build_strategy("flexlora")
    assert strategy.rank_reduction == "svd" and strategy.needs_every_update
    global_ = make(16, rng)
    for rank in (4, 8):
        start = strategy.adapter_for_rank(global_, rank)
        for prefix in MODULES:
            np.testing.assert_allclose(product(start, prefix), best_rank(product(global_, prefix), rank),
                                       rtol=1e-4, atol=1e-4)
    assert strategy.adapter_for_rank(global_, 16) is global_
    updates = het_updates(rng, strategy, global_)
    result = run_round(strategy, 1, global_, updates)
    assert adapter_rank(result) == 16
    for prefix in MODULES:
        np.testing.assert_allclose(product(result, prefix), best_rank(exact_mean(updates, prefix), 16),
                                   rtol=1e-5, atol=1e-4)
    strategy.begin_round(2, global_)
    with pytest.raises(ValueError, match="above the global rank"):
        strategy.accumulate(make(32, rng), 1)


def test_single_rank_strategies_refuse_other_ranks() -> None:
    rng = np.random.default_rng(11)
    global_ = make(8, rng)
    single_rank = [name for name, cls in STRATEGIES.items() if cls.rank_reduction == "none"]
    assert single_rank and "fedavg" in single_rank and "hetlora" not in single_rank
    for name in single_rank:
        strategy = build_strategy(name)
        assert not strategy.supports_heterogeneous_ranks
        assert strategy.adapter_for_rank(global_, 8) is global_
        with pytest.raises(ValueError, match="heterogeneous ranks"):
            strategy.adapter_for_rank(global_, 4)


# ---- partial sharing ---------------------------------------------------------

SQUARE = {"m.layers.0.q_proj": (10, 10), "m.layers.0.v_proj": (10, 10)}


@pytest.mark.parametrize("name,shared,kept", [("ffa-lora", "lora_B", "lora_A"), ("fedsa-lora", "lora_A", "lora_B")])
def test_partial_sharing(name: str, shared: str, kept: str) -> None:
    rng = np.random.default_rng(12)
    strategy = build_strategy(name)
    assert strategy.factor_plan["share"] == (shared,)
    global_ = make(4, rng, SQUARE)
    full_updates = client_updates(rng, global_, 3)
    updates = [({k: v for k, v in u.items() if f".{shared}." in k}, n) for u, n in full_updates]
    # half the arrays and, with A and B the same size, half the bytes
    assert 2 * len(updates[0][0]) == len(global_)
    assert 2 * sum(v.nbytes for v in updates[0][0].values()) == sum(v.nbytes for v in global_.values())
    result = run_round(strategy, 1, global_, updates)
    weights = [n for _, n in updates]
    for key in global_:
        if f".{kept}." in key:
            assert np.array_equal(result[key], global_[key])
        else:
            want = np.average(np.stack([u[key] for u, _ in updates]).astype(np.float64), axis=0, weights=weights)
            np.testing.assert_allclose(result[key], want, rtol=1e-6, atol=1e-7)
    if name == "ffa-lora":
        # A is common, so the mean of the products is exact: Σ wᵢ·Bᵢ·A = (Σ wᵢ·Bᵢ)·A
        for prefix in SQUARE:
            products = [n * (u[b_key(prefix)].astype(np.float64) @ global_[a_key(prefix)]) for u, n in updates]
            want = sum(products) / sum(weights)
            np.testing.assert_allclose(product(result, prefix), want, rtol=1e-5, atol=1e-5)
    strategy.begin_round(2, global_)
    with pytest.raises(ValueError, match=f"carry only \\['{shared}'\\]"):
        strategy.accumulate(full_updates[0][0], 1)


def test_factor_plans() -> None:
    assert build_strategy("ffa-lora").factor_plan == {"train": ("lora_B",), "share": ("lora_B",)}
    assert build_strategy("fedsa-lora").factor_plan == {"train": ("lora_A", "lora_B"), "share": ("lora_A",)}
    for name in ("fedprox", "fedadam", "krum", "exact-lora", "hetlora", "flexlora"):
        assert build_strategy(name).factor_plan == {"train": ("lora_A", "lora_B"), "share": ("lora_A", "lora_B")}


def test_lora_pairs_need_both_factors() -> None:
    with pytest.raises(ValueError, match="no matching"):
        lora_pairs({"m.q.lora_A.weight": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="no matching"):
        lora_pairs({"m.q.lora_B.weight": np.zeros((3, 2), np.float32)})
