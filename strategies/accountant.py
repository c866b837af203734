"""Rényi-DP accountant for the sampled Gaussian mechanism. Pure math: no files.

One step is one release of a sum whose per-participant contribution has L2
norm ≤ C, with Gaussian noise of standard deviation z·C added to the sum, each
participant having taken part independently with probability q (the sampled
Gaussian mechanism, SGM). In DP-FedAvg a participant is an organization and a
step is a round (strategies/dp_fedavg.py).

RDP of one step, at order α (Mironov, Talwar & Zhang 2019, "Rényi Differential
Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530):

    RDP(α) = log A_α / (α − 1),  A_α = E_{x~μ0}[((1 − q) + q·μ1(x)/μ0(x))^α],
    μ0 = N(0, z²), μ1 = N(1, z²)  (sensitivity 1 after dividing by C)

* integer α (their eq. for A_α as a finite binomial sum, Section 3.2):
      A_α = Σ_{k=0..α} C(α,k) (1−q)^{α−k} q^k exp((k² − k) / (2z²))
* fractional α (Section 3.3): split the integral at
      z0 = z²·log(1/q − 1) + 1/2,
  where q·μ1/μ0 = 1 − q; expand each side with the generalized binomial series
  (terms alternate in sign past k > α) and integrate each term exactly:
      A_α = Σ_k C(α,k) (1−q)^{α−k} q^k e^{(k²−k)/(2z²)} ½erfc((k − z0)/(√2 z))
          + Σ_k C(α,k) q^{α−k} (1−q)^k e^{(j²−j)/(2z²)} ½erfc((z0 − j)/(√2 z)),  j = α − k
  summed until both terms fall below e^-30.
* q = 1 (no subsampling): the Gaussian mechanism, RDP(α) = α / (2z²) exactly.

RDP composes by addition over steps (Mironov 2017, Prop. 1). Conversion to
(ε, δ): the improved bound of Balle, Barthe, Gaboardi, Hsu & Sato 2020,
"Hypothesis Testing Interpretations and Rényi Differential Privacy" (AISTATS,
Theorem 21; also Canonne, Kamath & Steinke 2020, Prop. 12):

    ε = min_α [ RDP(α) + log((α − 1)/α) − (log δ + log α)/(α − 1) ]

(the classic conversion of Mironov 2017, Prop. 3, ε = RDP(α) + log(1/δ)/(α − 1),
is available as ``conversion="classic"`` for comparison with older papers).
Both are upper bounds: for q = 1 the exact ε of the Gaussian mechanism
(Balle & Wang 2018) is smaller; the tests check both facts.

The adjacency is add/remove one participant (Poisson sampling). Fixed-size
sampling of k out of n without replacement, as the coordinator does, is
accounted here with q = k/n, the usual approximation (exact when k = n).

The accountant keeps a ledger of (q, z, steps) entries; the total RDP is
always recomputed from the ledger in order, so an accountant restored from
``state_dict`` (plain JSON types) reports bit-identical ε.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

#: orders α tried by default: a fine grid where small-ε optima lie, then coarser
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)] + [64.0, 80.0, 96.0, 128.0, 256.0]
)

_CONVERSIONS = ("improved", "classic")


# ---- log-space helpers -------------------------------------------------------

def _log_add(a: float, b: float) -> float:
    """log(e^a + e^b)."""
    hi, lo = (a, b) if a >= b else (b, a)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(e^a − e^b) for a ≥ b; ArithmeticError when rounding made it negative."""
    if b == -math.inf:
        return a
    if a < b:
        raise ArithmeticError("log-space subtraction went negative")
    if a == b:
        return -math.inf
    return a + math.log1p(-math.exp(b - a))


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate where erfc(x) underflows (x > ~26)."""
    if x < 25.0:
        return math.log(math.erfc(x))
    # asymptotic series: erfc(x) = e^{-x²}/(x√π)·(1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶) + 105/(16x⁸) − …)
    inv = 1.0 / (x * x)
    series = 1.0 - inv / 2 + 3 * inv**2 / 4 - 15 * inv**3 / 8 + 105 * inv**4 / 16
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)


def _log_binom(alpha: float, k: int) -> tuple[float, float]:
    """(log|C(α,k)|, sign of C(α,k)) for real α ≥ 0 and integer k ≥ 0."""
    if k == 0:
        return 0.0, 1.0
    sign = 1.0
    log_abs = math.lgamma(alpha + 1) - math.lgamma(k + 1)
    # C(α,k) = Γ(α+1) / (Γ(k+1) Γ(α−k+1)); Γ of a negative non-integer has a sign
    rest = alpha - k + 1
    if rest <= 0 and float(rest).is_integer():
        return -math.inf, 0.0  # integer α < k: the coefficient is 0
    log_abs -= math.lgamma(rest)
    if rest < 0:
        # sign of Γ(x) for x < 0 non-integer: (−1)^ceil(−x)
        sign = -1.0 if math.ceil(-rest) % 2 else 1.0
    return log_abs, sign


# ---- one step ----------------------------------------------------------------

def _log_a_int(q: float, z: float, alpha: int) -> float:
    log_a = -math.inf
    log_q, log_1q = math.log(q), math.log1p(-q)
    for k in range(alpha + 1):
        log_coef = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        term = log_coef + k * log_q + (alpha - k) * log_1q + (k * k - k) / (2 * z * z)
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_frac(q: float, z: float, alpha: float) -> float:
    log_q, log_1q = math.log(q), math.log1p(-q)
    z0 = z * z * (math.log(1 / q - 1)) + 0.5
    # the two halves, each a signed sum kept as (positive part, negative part) in log space
    pos = [-math.inf, -math.inf]
    neg = [-math.inf, -math.inf]
    k = 0
    while True:
        log_coef, sign = _log_binom(alpha, k)
        j = alpha - k
        s0 = (log_coef + k * log_q + j * log_1q + (k * k - k) / (2 * z * z)
              + math.log(0.5) + _log_erfc((k - z0) / (math.sqrt(2) * z)))
        s1 = (log_coef + j * log_q + k * log_1q + (j * j - j) / (2 * z * z)
              + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * z)))
        if sign > 0:
            pos[0], pos[1] = _log_add(pos[0], s0), _log_add(pos[1], s1)
        elif sign < 0:
            neg[0], neg[1] = _log_add(neg[0], s0), _log_add(neg[1], s1)
        k += 1
        if k > alpha and max(s0, s1) < -30:
            break
        if k > 10_000:
            raise ArithmeticError("series did not converge")
    return _log_add(_log_sub(pos[0], neg[0]), _log_sub(pos[1], neg[1]))


def rdp_of_step(q: float, noise_multiplier: float, alpha: float) -> float:
    """RDP at order ``alpha`` of one step of the sampled Gaussian mechanism."""
    q, z, alpha = float(q), float(noise_multiplier), float(alpha)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling rate q must be in [0, 1], got {q!r}")
    if not z >= 0.0:
        raise ValueError(f"noise multiplier must be >= 0, got {z!r}")
    if not alpha > 1.0:
        raise ValueError(f"RDP order must be > 1, got {alpha!r}")
    if q == 0.0:
        return 0.0
    if z == 0.0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * z * z)
    try:
        if alpha.is_integer():
            log_a = _log_a_int(q, z, int(alpha))
        else:
            log_a = _log_a_frac(q, z, alpha)
    except (ArithmeticError, OverflowError):
        return math.inf  # numerically out of reach: this order is simply not used
    return log_a / (alpha - 1)


def compute_rdp(q: float, noise_multiplier: float, steps: int,
                orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP at each order after ``steps`` steps with the same q and z."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    return np.array([rdp_of_step(q, noise_multiplier, a) for a in orders], dtype=np.float64) * steps


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float,
                   conversion: str = "improved") -> tuple[float, float]:
    """(ε, the order that gave it) for ``delta``; see the module docstring."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if conversion not in _CONVERSIONS:
        raise ValueError(f"conversion must be one of {_CONVERSIONS}, got {conversion!r}")
    best, best_order = math.inf, math.nan
    for alpha, r in zip(orders, rdp):
        alpha, r = float(alpha), float(r)
        if not math.isfinite(r):
            continue
        if conversion == "improved":
            eps = r + math.log1p(-1.0 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        else:
            eps = r + math.log(1.0 / delta) / (alpha - 1)
        if eps < best:
            best, best_order = eps, alpha
    return max(0.0, best), best_order


# ---- the ledger ----------------------------------------------------------------

class RdpAccountant:
    """(ε, δ) spent so far by a sequence of sampled-Gaussian steps.

    ``step(q, z)`` after each release; ``epsilon(δ)`` what has been spent;
    ``would_exceed(ε_max, δ, q, z)`` asks before the next release.
    """

    def __init__(self, orders: Iterable[float] = DEFAULT_ORDERS) -> None:
        self.orders = tuple(float(a) for a in orders)
        if not self.orders or any(not a > 1.0 for a in self.orders):
            raise ValueError("RDP orders must all be > 1")
        self.ledger: list[dict[str, float | int]] = []   # [{"q", "noise_multiplier", "steps"}], in order
        self._per_step: dict[tuple[float, float], np.ndarray] = {}

    # -- recording --
    def step(self, q: float, noise_multiplier: float, steps: int = 1) -> None:
        q, z = float(q), float(noise_multiplier)
        self._rdp_per_step(q, z)  # validates
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        last = self.ledger[-1] if self.ledger else None
        if last is not None and last["q"] == q and last["noise_multiplier"] == z:
            last["steps"] = int(last["steps"]) + int(steps)
        else:
            self.ledger.append({"q": q, "noise_multiplier": z, "steps": int(steps)})

    @property
    def steps(self) -> int:
        return sum(int(e["steps"]) for e in self.ledger)

    # -- reading --
    def _rdp_per_step(self, q: float, z: float) -> np.ndarray:
        key = (q, z)
        if key not in self._per_step:
            self._per_step[key] = compute_rdp(q, z, 1, self.orders)
        return self._per_step[key]

    def rdp(self, extra: list[dict[str, float | int]] | None = None) -> np.ndarray:
        """Total RDP per order, the ledger (plus ``extra`` entries) summed in order."""
        total = np.zeros(len(self.orders), dtype=np.float64)
        for entry in [*self.ledger, *(extra or [])]:
            total = total + self._rdp_per_step(float(entry["q"]), float(entry["noise_multiplier"])) * int(entry["steps"])
        return total

    def get_privacy_spent(self, delta: float, conversion: str = "improved") -> tuple[float, float]:
        """(ε, best order) spent so far; ε is 0 before any step."""
        if not self.ledger:
            return 0.0, math.nan
        return rdp_to_epsilon(self.orders, self.rdp(), delta, conversion)

    def epsilon(self, delta: float) -> float:
        return self.get_privacy_spent(delta)[0]

    def epsilon_after(self, delta: float, q: float, noise_multiplier: float, steps: int = 1) -> float:
        """ε if ``steps`` more steps with (q, z) were taken; the ledger is not changed."""
        extra = [{"q": float(q), "noise_multiplier": float(noise_multiplier), "steps": int(steps)}]
        return rdp_to_epsilon(self.orders, self.rdp(extra), delta)[0]

    def would_exceed(self, eps_max: float, delta: float, q: float, noise_multiplier: float, steps: int = 1) -> bool:
        """True when taking the next ``steps`` step(s) would spend more than ``eps_max``."""
        return self.epsilon_after(delta, q, noise_multiplier, steps) > eps_max

    # -- persistence (plain JSON types: it goes into the checkpoint's run_state) --
    def state_dict(self) -> dict[str, Any]:
        return {"orders": list(self.orders), "ledger": [dict(e) for e in self.ledger]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        orders = tuple(float(a) for a in state["orders"])
        ledger = []
        for entry in state["ledger"]:
            if set(entry) != {"q", "noise_multiplier", "steps"}:
                raise ValueError(f"accountant ledger entry has keys {sorted(entry)}")
            ledger.append({"q": float(entry["q"]), "noise_multiplier": float(entry["noise_multiplier"]),
                           "steps": int(entry["steps"])})
        if orders != self.orders:
            self.orders = orders
            self._per_step = {}
        self.ledger = ledger
