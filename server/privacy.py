"""The coordinator's privacy ledger: what a differentially private job has spent.

Flower's DP accountant only works with an unmodified FedAvg; ours follows our
own strategies (strategies/dp_fedavg.py) and our own round loop. The math is
strategies/accountant.py; this file decides *when* a round is charged and
stops the job before a round that would spend more than ``dp-epsilon-max``.

* "server" placement: a round is charged when its global is released (the
  strategy's ``finish_round``), with q = sampled/online. An attempt below
  quorum released nothing (no aggregate, no noise drawn) and is not charged.
* "local" placement: every attempt is charged (q = 1) as soon as it is sent
  out: the organizations' noised updates reach the coordinator whether or not
  the round then reaches quorum.
* secure aggregation (placement "server"): charged as "server". The released
  global is the same mechanism — the sum of deltas clipped to C, noise z·C
  added once — only the clipping moved to the organizations; an attempt that
  unmasks no sum released nothing.

The ledger is JSON and goes into every checkpoint's run_state ("privacy"):
a resumed coordinator continues it. The budget check comes after sampling and
before any instruction of the round is pushed.

Adjacency: add/remove one organization ("server"; McMahan et al. 2018), or
zero-out of one organization's contribution ("local": its clipped delta vs. a
zero delta). For replacing one organization's data by any other (sensitivity
2C) the same numbers hold at half the noise multiplier.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from strategies.accountant import RdpAccountant
from strategies.dp_fedavg import PrivacyStep, PrivateStrategy

log = logging.getLogger("silotune.server")

ACCOUNTANT = ("RDP of the sampled Gaussian mechanism (Mironov, Talwar & Zhang 2019); (ε, δ) by the "
              "conversion of Balle et al. 2020 (Theorem 21)")


class PrivacyBudgetExhausted(RuntimeError):
    """The next round would spend more than dp-epsilon-max; the job stops before it."""


class PrivacyLedger:
    def __init__(self, strategy: PrivateStrategy, epsilon_max: float, delta: float,
                 secure_aggregation: bool = False) -> None:
        self.strategy = strategy
        self.secure_aggregation = secure_aggregation   # organizations clip; the coordinator sees only sums
        self.epsilon_max = float(epsilon_max)   # 0: no budget (still tracked and reported)
        self.delta = float(delta)
        self.accountant = RdpAccountant()
        self._pending: PrivacyStep | None = None

    @classmethod
    def for_job(cls, strategy: Any, epsilon_max: float, delta: float,
                secure_aggregation: bool = False) -> "PrivacyLedger | None":
        """A ledger when the strategy is differentially private, else None."""
        if isinstance(strategy, PrivateStrategy):
            return cls(strategy, epsilon_max, delta, secure_aggregation)
        return None

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)

    def before_round(self, server_round: int, sampled: int, online: int) -> PrivacyStep:
        """Plan the round with the strategy; stop before it if it would exceed the budget."""
        step = self.strategy.plan_round(sampled, online)
        if self.epsilon_max > 0:
            after = self.accountant.epsilon_after(self.delta, step.q, step.noise_multiplier)
            if after > self.epsilon_max:
                raise PrivacyBudgetExhausted(
                    f"privacy budget: round {server_round} would bring ε to {after:.4g} > dp-epsilon-max="
                    f"{self.epsilon_max:g} (δ={self.delta:g}, q={step.q:.4g}, z={step.noise_multiplier:g}); "
                    f"spent so far ε={self.epsilon:.4g} in {self.accountant.steps} charged round(s). "
                    f"The job stops before round {server_round}; the last checkpoint is its result."
                )
        if self.strategy.noise_placement == "local":
            self._charge(step)  # the noised updates leave the organizations with this attempt
            self._pending = None
        else:
            self._pending = step
        return step

    def released(self) -> None:
        """The round's global was computed (and is about to be released): charge it."""
        if self._pending is not None:
            self._charge(self._pending)
            self._pending = None

    def _charge(self, step: PrivacyStep) -> None:
        self.accountant.step(step.q, step.noise_multiplier)

    def round_summary(self) -> dict[str, float]:
        step = self.accountant.ledger[-1] if self.accountant.ledger else None
        return {"epsilon": self.epsilon, "delta": self.delta,
                "q": float(step["q"]) if step else math.nan}

    def provenance(self) -> dict[str, Any]:
        """What the exported specialist and report.json say about privacy."""
        strategy = self.strategy
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "epsilon_max": self.epsilon_max or None,
            "charged_rounds": self.accountant.steps,
            "ledger": [dict(e) for e in self.accountant.ledger],
            "noise_multiplier": strategy.noise_multiplier,
            "clip_norm": getattr(strategy, "clip_norm", None),
            "noise_placement": strategy.noise_placement,
            "secure_aggregation": self.secure_aggregation,
            "clipped_by": ("the coordinator" if strategy.noise_placement == "server" and not self.secure_aggregation
                           else "each organization"),
            "unit": "organization (client-level DP)",
            "adjacency": ("add/remove one organization" if strategy.noise_placement == "server"
                          else "zero-out one organization's contribution; against the coordinator too"),
            "accountant": ACCOUNTANT,
        }

    def state_dict(self) -> dict[str, Any]:
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.accountant.load_state_dict(state)
