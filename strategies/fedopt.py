"""The FedOpt family's common part (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021), shared by FedAdam, FedYogi and FedAdagrad.

Each round: the example-weighted mean of the updates (FedAvg's float64
sums), the pseudo-gradient Δ = mean − global, then one step of an adaptive
server optimizer (Reddi et al., Algorithm 2; Flower's ``FedOpt``):

    m ← β₁·m + (1 − β₁)·Δ
    v ← (per optimizer, from Δ²)
    global ← global + η_t · m / (√v + τ)

m and v start at zero, as in Flower (the paper allows v₀ ≥ τ²). They are
kept in float64 and, with the step count t, are the strategy state: a
coordinator restarted between rounds continues bit for bit.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from protos.adapter import Adapter
from strategies.base import AggregationError, Strategy
from strategies.checks import check_float, check_same_layout, check_state_layout
from strategies.fedavg import FedAvg

_M, _V, _STEP = "m/", "v/", "step"


class FedOpt(Strategy):
    """Base of the adaptive server optimizers; subclasses define the v update.

    Parameters (validated here, documented with each subclass):
        eta: server learning rate η > 0.
        beta_1: first-moment decay in [0, 1).
        beta_2: second-moment decay in [0, 1).
        tau: adaptivity / numerical floor τ > 0.
    """

    family = "classic"
    linear = True  # Δ = mean − global: the mean is all it needs

    def __init__(self, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        owner = self.name
        self.eta = check_float(owner, "eta", eta, low=0.0, low_open=True)
        self.beta_1 = check_float(owner, "beta_1", beta_1, low=0.0, high=1.0, high_open=True)
        self.beta_2 = check_float(owner, "beta_2", beta_2, low=0.0, high=1.0, high_open=True)
        self.tau = check_float(owner, "tau", tau, low=0.0, low_open=True)
        self._mean = FedAvg()
        self._global: Adapter | None = None
        self._m: dict[str, np.ndarray] | None = None
        self._v: dict[str, np.ndarray] | None = None
        self._step = 0  # server optimizer steps taken (not rounds: a failed round takes none)

    @abstractmethod
    def _next_v(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        """The new second moment from the old one and Δ² (float64)."""

    def _learning_rate(self, step: int) -> float:
        """η_t for the step-th step (1-based); constant unless a subclass corrects bias."""
        return self.eta

    def begin_round(self, server_round: int, global_adapter: Adapter) -> None:
        if self._m is not None and self._v is not None:
            check_state_layout(self._m, global_adapter, f"{self.name} first-moment")
            check_state_layout(self._v, global_adapter, f"{self.name} second-moment")
        self._global = global_adapter
        self._mean.begin_round(server_round, global_adapter)

    def accumulate(self, update: Adapter, num_examples: int) -> None:
        if self._global is not None:
            check_same_layout(update, self._global)  # FedAvg checks names only; numpy would broadcast shapes
        self._mean.accumulate(update, num_examples)

    def finish_round(self) -> Adapter:
        if self._global is None:
            raise AggregationError("finish_round() before begin_round()")
        mean = self._mean.finish_round()
        step = self._step + 1
        lr = self._learning_rate(step)
        new_m: dict[str, np.ndarray] = {}
        new_v: dict[str, np.ndarray] = {}
        result: Adapter = {}
        for key, value in mean.items():
            old = self._global[key].astype(np.float64)
            delta = value.astype(np.float64) - old
            m = self._m[key] if self._m is not None else np.zeros_like(delta)
            v = self._v[key] if self._v is not None else np.zeros_like(delta)
            new_m[key] = self.beta_1 * m + (1.0 - self.beta_1) * delta
            new_v[key] = self._next_v(v, delta * delta)
            result[key] = (old + lr * new_m[key] / (np.sqrt(new_v[key]) + self.tau)).astype(np.float32)
        # commit only once the whole step is computed: a failure leaves the state as it was
        self._m, self._v, self._step, self._global = new_m, new_v, step, None
        return result

    def state_dict(self) -> dict[str, np.ndarray]:
        if self._m is None or self._v is None:
            return {}
        state = {_M + k: x.copy() for k, x in self._m.items()}
        state.update({_V + k: x.copy() for k, x in self._v.items()})
        state[_STEP] = np.array(self._step, dtype=np.int64)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if not state:
            self._m, self._v, self._step = None, None, 0
            return
        bad = [k for k in state if k != _STEP and not k.startswith((_M, _V))]
        if bad or _STEP not in state:
            raise ValueError(f"strategy {self.name!r}: unexpected state keys {sorted(bad)[:3] or 'without step'}")
        m = {k[len(_M):]: np.array(x, dtype=np.float64) for k, x in state.items() if k.startswith(_M)}
        v = {k[len(_V):]: np.array(x, dtype=np.float64) for k, x in state.items() if k.startswith(_V)}
        if m.keys() != v.keys():
            raise ValueError(f"strategy {self.name!r}: state moments m and v name different tensors")
        self._m, self._v, self._step = m, v, int(np.asarray(state[_STEP]).reshape(()))
