"""The RDP accountant against independent references.

* Opacus 1.6.0's RDP accountant (``opacus/accountants/analysis/rdp.py``, a
  separate implementation of Mironov et al. 2019 with the same improved
  (ε, δ) conversion), pinned in the dev extra. Its module is loaded by path:
  it needs only numpy and scipy, and importing the ``opacus`` package would
  import torch (seconds on a busy 2-core machine).
* For q = 1, the closed form α/(2z²) and the exact ε of the Gaussian mechanism
  (Balle & Wang 2018, "Improving the Gaussian mechanism for differential
  privacy", Theorem 8): the RDP bound must lie above it, and not far.
* The defining integral A_α, evaluated numerically with mpmath (a torch
  dependency, so always present) for fractional orders.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from strategies.accountant import DEFAULT_ORDERS, RdpAccountant, compute_rdp, rdp_of_step, rdp_to_epsilon


def _opacus_rdp():
    spec = importlib.util.find_spec("opacus")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("opacus (dev extra) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "accountants" / "analysis" / "rdp.py"
    module_spec = importlib.util.spec_from_file_location("opacus_rdp_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def opacus_rdp():
    return _opacus_rdp()


ORDERS = list(DEFAULT_ORDERS)

# (q, z, steps, delta): the Abadi et al. 2016 regime (q = 0.01, z = 1.1, δ = 1e-5),
# small and large q, strong and weak noise
CASES = [
    (0.01, 1.1, 1000, 1e-5),
    (0.01, 1.1, 10000, 1e-5),
    (0.01, 4.0, 10000, 1e-5),
    (0.001, 0.8, 50000, 1e-6),
    (0.05, 0.7, 200, 1e-5),
    (0.3, 1.5, 50, 1e-5),
    (0.6, 2.0, 30, 1e-3),
    (1.0, 1.0, 2, 1e-5),
    (1.0, 5.0, 100, 1e-5),
]


@pytest.mark.parametrize("q,z,steps,delta", CASES)
def test_epsilon_matches_opacus(opacus_rdp, q: float, z: float, steps: int, delta: float) -> None:
    ours = compute_rdp(q, z, steps, ORDERS)
    theirs = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=ORDERS))
    # per-order RDP: relative agreement, except where both are ~1e-10 (log A ≈ 1e-12: rounding of log(1 + tiny))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12)
    eps, order = rdp_to_epsilon(ORDERS, ours, delta)
    with warnings.catch_warnings():  # opacus warns when the optimum is at the edge of the orders
        warnings.simplefilter("ignore")
        ref_eps, ref_order = opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=theirs, delta=delta)
    assert eps == pytest.approx(float(ref_eps), rel=1e-9, abs=1e-12)
    assert order == ref_order
    accountant = RdpAccountant(ORDERS)
    for piece in (steps // 2, 1, steps - steps // 2 - 1):  # pieces merge into one ledger entry
        if piece:
            accountant.step(q, z, piece)
    assert accountant.steps == steps
    assert accountant.epsilon(delta) == pytest.approx(float(ref_eps), rel=1e-9)


def test_per_step_rdp_matches_opacus_on_a_grid(opacus_rdp) -> None:
    orders = [1.25, 1.5, 2.0, 3.0, 4.5, 8.0, 16.0, 32.0, 63.0]
    for q in (1e-3, 0.01, 0.1, 0.5, 0.9):
        for z in (0.5, 1.0, 2.0, 8.0):
            ours = compute_rdp(q, z, 1, orders)
            theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=orders)
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12, err_msg=f"q={q} z={z}")


@pytest.mark.parametrize("z", [0.5, 1.0, 3.0])
def test_no_subsampling_is_the_gaussian_closed_form(z: float) -> None:
    for alpha in (1.5, 2.0, 7.3, 32.0):
        assert rdp_of_step(1.0, z, alpha) == alpha / (2 * z * z)
    # composition: T steps at z are one step at z/√T
    np.testing.assert_allclose(compute_rdp(1.0, z, 4, ORDERS), compute_rdp(1.0, z / 2, 1, ORDERS), rtol=1e-15)


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest ε with δ(ε) ≤ delta for a Gaussian mechanism with μ = sensitivity/σ
    (Balle & Wang 2018, Theorem 8): δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z,steps", [(1.0, 2), (1.0, 10), (2.0, 50), (0.7, 1)])
def test_no_subsampling_bound_is_above_the_exact_gaussian_epsilon(z: float, steps: int) -> None:
    exact = _exact_gaussian_epsilon(math.sqrt(steps) / z, 1e-5)
    accountant = RdpAccountant()
    accountant.step(1.0, z, steps)
    eps = accountant.epsilon(1e-5)
    assert exact < eps < exact * 1.25, (exact, eps)
    # the improved conversion is tighter than the classic one
    assert eps < accountant.get_privacy_spent(1e-5, conversion="classic")[0]


def test_fractional_orders_match_the_defining_integral() -> None:
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30

    def integral(q: float, z: float, alpha: float) -> float:
        q_, z_, a_ = mp.mpf(q), mp.mpf(z), mp.mpf(alpha)
        f = lambda x: mp.npdf(x, 0, z_) * ((1 - q_) + q_ * mp.exp((2 * x - 1) / (2 * z_ * z_))) ** a_
        return float(mp.log(mp.quad(f, [-mp.inf, -10 * z_, 0, 1, 10 * z_ + a_, mp.inf])) / (a_ - 1))

    for q, z, alpha in [(0.01, 1.1, 2.5), (0.1, 0.8, 5.5), (0.5, 2.0, 1.3), (0.9, 1.0, 3.7)]:
        assert rdp_of_step(q, z, alpha) == pytest.approx(integral(q, z, alpha), rel=1e-8)


def test_edges() -> None:
    assert rdp_of_step(0.0, 1.0, 2.0) == 0.0
    assert rdp_of_step(0.1, 0.0, 2.0) == math.inf
    accountant = RdpAccountant()
    assert accountant.epsilon(1e-5) == 0.0
    accountant.step(0.5, 0.0)
    assert accountant.epsilon(1e-5) == math.inf
    for bad in [(1.5, 1.0), (-0.1, 1.0), (0.5, -1.0)]:
        with pytest.raises(ValueError):
            RdpAccountant().step(*bad)
    with pytest.raises(ValueError):
        RdpAccountant().step(0.5, 1.0, 0)
    with pytest.raises(ValueError):
        rdp_to_epsilon(ORDERS, compute_rdp(0.1, 1.0, 1), 0.0)
    with pytest.raises(ValueError):
        RdpAccountant([1.0, 2.0])


def test_would_exceed_looks_ahead_without_spending() -> None:
    accountant = RdpAccountant()
    accountant.step(1.0, 1.0)
    one = accountant.epsilon(1e-5)
    two = accountant.epsilon_after(1e-5, 1.0, 1.0)
    assert accountant.steps == 1 and one < two
    assert accountant.would_exceed((one + two) / 2, 1e-5, 1.0, 1.0)
    assert not accountant.would_exceed(two, 1e-5, 1.0, 1.0)
    assert accountant.epsilon(1e-5) == one


def test_state_round_trips_bit_exactly_through_json() -> None:
    accountant = RdpAccountant()
    for q, z in [(0.3, 1.0), (0.3, 1.0), (0.25, 1.0), (1.0, 1.3), (0.3, 1.0)]:
        accountant.step(q, z)
    assert [e["steps"] for e in accountant.ledger] == [2, 1, 1, 1]  # consecutive equal steps merge
    restored = RdpAccountant()
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.ledger == accountant.ledger
    assert restored.rdp().tobytes() == accountant.rdp().tobytes()
    assert restored.epsilon(1e-5) == accountant.epsilon(1e-5)
    # continuing either gives the same bits
    accountant.step(0.2, 0.9)
    restored.step(0.2, 0.9)
    assert restored.epsilon(1e-6) == accountant.epsilon(1e-6)
    with pytest.raises(ValueError):
        restored.load_state_dict({"orders": ORDERS, "ledger": [{"q": 0.1}]})
