"""Strategies by name, for run configs and scenario files."""

from __future__ import annotations

import inspect
from typing import Any

from strategies.base import Strategy
from strategies.fedavg import FedAvg

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg,)}


def build_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Instantiate a strategy; unknown names and parameters list the valid ones."""
    params = dict(params or {})
    try:
        cls = STRATEGIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid: {sorted(STRATEGIES)}") from None
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"strategy {name!r} has no parameter(s) {unknown}; valid: {accepted or 'none'}"
        )
    return cls(**params)
