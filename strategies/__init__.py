"""Aggregation math over adapter updates. Pure: no network, no files.

One strategy a file; all share the streaming interface in ``base.py`` and
register themselves by name with ``@register_strategy`` (``registry.py``).
``build_strategy(name, params)`` turns a run-config choice into one.

Importing this package imports no strategy module: ``STRATEGIES`` imports them
all the first time it is asked for a name.
"""

from strategies.base import AggregationError, Strategy
from strategies.registry import STRATEGIES, build_strategy, register_strategy

__all__ = ["AggregationError", "Strategy", "STRATEGIES", "build_strategy", "register_strategy"]
