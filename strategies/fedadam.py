"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

Adam as the server optimizer over the pseudo-gradient (see fedopt.py):
v ← β₂·v + (1 − β₂)·Δ². Like Flower's FedAdam, the step applies Adam's bias
correction in Kingma & Ba's form η_t = η·√(1 − β₂ᵗ)/(1 − β₁ᵗ), with τ
outside the square root. Unlike Flower, t counts the server steps actually
taken (1, 2, ...; saved in the state); Flower uses ``server_round + 1``,
which is one step off from the start and ties the rate to round numbering.
"""

from __future__ import annotations

import numpy as np

from strategies.fedopt import FedOpt
from strategies.registry import register_strategy


@register_strategy("fedadam")
class FedAdam(FedOpt):
    """Server-side Adam over the organizations' weighted mean update.

    Parameters (defaults: Flower 1.41's ``flwr.serverapp.strategy.FedAdam``):
        eta: server learning rate η > 0 (default 0.1).
        beta_1: first-moment decay in [0, 1) (default 0.9).
        beta_2: second-moment decay in [0, 1) (default 0.99).
        tau: adaptivity τ > 0 (default 1e-3; Flower's legacy
            ``flwr.server.strategy.FedAdam`` used 1e-9, which makes the first
            steps ≈ η·sign(Δ), far too large for LoRA factors).
    """

    def __init__(self, eta: float = 1e-1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _next_v(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta_sq

    def _learning_rate(self, step: int) -> float:
        return self.eta * float(np.sqrt(1.0 - self.beta_2**step)) / (1.0 - self.beta_1**step)
