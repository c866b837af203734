"""Strategies by name, for run configs and scenario files.

A strategy registers itself where it is defined::

    @register_strategy("fedavg")
    class FedAvg(Strategy): ...

which also sets ``FedAvg.name``. ``STRATEGIES`` imports every module of this
package the first time it is asked for a name, so adding a strategy is adding
one module here (or on ``strategies.__path__``); nothing else lists them.
Names are listed by family (``Strategy.family``: classic, robust, LoRA-specific,
private, then any other), alphabetically within a family.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from strategies.base import STRATEGIES, Strategy

register_strategy = STRATEGIES.register


def strategy_names(where: Callable[[type[Strategy]], bool] | None = None) -> list[str]:
    """Registered names, in family order, of the classes for which ``where`` holds."""
    return [name for name, cls in STRATEGIES.items() if where is None or where(cls)]


def linear_strategies() -> list[str]:
    """Strategies that take the example-weighted mean secure aggregation hands over."""
    return strategy_names(lambda cls: cls.linear)


def heterogeneous_rank_strategies() -> list[str]:
    """Strategies whose organizations may train a rank below the global's."""
    return strategy_names(lambda cls: cls.rank_reduction != "none")


def build_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Instantiate a strategy; unknown names and parameters list the valid ones.

    Bad parameter values raise ValueError naming the parameter and its range.
    """
    params = dict(params or {})
    cls = STRATEGIES.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"strategy {name!r} has no parameter(s) {unknown}; valid: {accepted or 'none'}"
        )
    return cls(**params)
