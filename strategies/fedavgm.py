"""FedAvgM: FedAvg with server momentum (Hsu, Qi & Brown, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019).

With Δ = mean(updates) − global (the negative pseudo-gradient):
v ← β·v + Δ, global ← global + η·v. This is Flower's FedAvgM (heavy-ball
SGD in PyTorch's convention, no Nesterov) with the sign flipped: Flower keeps
the pseudo-gradient global − mean and subtracts. In the first round v = Δ,
as in Flower. The mean is FedAvg's (float64 sums); v is kept in float64 and
is the strategy state, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import numpy as np

from protos.adapter import Adapter
from strategies.base import AggregationError, Strategy
from strategies.checks import check_float, check_same_layout, check_state_layout
from strategies.fedavg import FedAvg
from strategies.registry import register_strategy

_V = "momentum/"


@register_strategy("fedavgm")
class FedAvgM(Strategy):
    """Example-weighted mean followed by a server SGD-with-momentum step.

    Parameters:
        server_learning_rate: η > 0 (default 1.0).
        server_momentum: β in [0, 1) (default 0.9; Flower's default is 0.0,
            which with η = 1 is plain FedAvg).
    """

    family = "classic"

    linear = True  # momentum on mean − global

    def __init__(self, server_learning_rate: float = 1.0, server_momentum: float = 0.9) -> None:
        self.server_learning_rate = check_float(
            self.name, "server_learning_rate", server_learning_rate, low=0.0, low_open=True
        )
        self.server_momentum = check_float(
            self.name, "server_momentum", server_momentum, low=0.0, high=1.0, high_open=True
        )
        self._mean = FedAvg()
        self._global: Adapter | None = None
        self._v: dict[str, np.ndarray] | None = None

    def begin_round(self, server_round: int, global_adapter: Adapter) -> None:
        if self._v is not None:
            check_state_layout(self._v, global_adapter, f"{self.name} momentum")
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
        v = self._v if self._v is not None else {k: np.zeros(x.shape, np.float64) for k, x in mean.items()}
        result: Adapter = {}
        new_v: dict[str, np.ndarray] = {}
        for key, value in mean.items():
            old = self._global[key].astype(np.float64)
            new_v[key] = self.server_momentum * v[key] + (value.astype(np.float64) - old)
            result[key] = (old + self.server_learning_rate * new_v[key]).astype(np.float32)
        # commit only once the whole step is computed: a failure leaves the state as it was
        self._v, self._global = new_v, None
        return result

    def state_dict(self) -> dict[str, np.ndarray]:
        if self._v is None:
            return {}
        return {_V + key: value.copy() for key, value in self._v.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if not state:
            self._v = None
            return
        bad = [k for k in state if not k.startswith(_V)]
        if bad:
            raise ValueError(f"strategy {self.name!r}: unexpected state keys {sorted(bad)[:3]}")
        self._v = {k[len(_V):]: np.array(v, dtype=np.float64) for k, v in state.items()}

