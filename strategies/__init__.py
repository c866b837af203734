"""Aggregation math over adapter updates. Pure: no network, no files.

One strategy a file; all share the streaming interface in ``base.py``.
``registry.build_strategy(name, params)`` turns a run-config choice into one.
"""

from strategies.base import AggregationError, Strategy
from strategies.registry import STRATEGIES, build_strategy

__all__ = ["AggregationError", "Strategy", "STRATEGIES", "build_strategy"]
