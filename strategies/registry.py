"""Strategies by name, for run configs and scenario files."""

from __future__ import annotations

import inspect
from typing import Any

from strategies.base import Strategy
from strategies.dp_fedavg import DpFedAvg
from strategies.exact_lora import ExactLora
from strategies.fedadagrad import FedAdagrad
from strategies.fedadam import FedAdam
from strategies.fedavg import FedAvg
from strategies.fedavgm import FedAvgM
from strategies.fedprox import FedProx
from strategies.fedsa_lora import FedSaLora
from strategies.fedyogi import FedYogi
from strategies.ffa_lora import FfaLora
from strategies.flexlora import FlexLora
from strategies.hetlora import HetLora
from strategies.krum import Krum
from strategies.median import Median
from strategies.norm_bounded import NormBounded
from strategies.trimmed_mean import TrimmedMean

# listed by family (classic, robust, LoRA-specific, private), the order error messages show
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad,
        Median, TrimmedMean, Krum, NormBounded,
        ExactLora, HetLora, FlexLora, FfaLora, FedSaLora,
        DpFedAvg,
    )
}


def build_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Instantiate a strategy; unknown names and parameters list the valid ones.

    Bad parameter values raise ValueError naming the parameter and its range.
    """
    params = dict(params or {})
    try:
        cls = STRATEGIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid: {list(STRATEGIES)}") from None
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"strategy {name!r} has no parameter(s) {unknown}; valid: {accepted or 'none'}"
        )
    return cls(**params)
