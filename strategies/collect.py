"""The common part of strategies that need every update of a round at once.

Robust statistics (median, trimmed mean, Krum) and exact LoRA re-factoring
cannot be computed from running sums: they keep a float32 copy of each
accepted update until ``finish_round``, so the coordinator's memory grows
with the number of replies. Such a strategy says so (``needs_every_update``)
and caps the replies per round (``max_updates``): the update past the cap is
refused with an AggregationError rather than exhausting memory.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np

from protos.adapter import Adapter
from strategies.base import AggregationError, Strategy
from strategies.checks import check_int, check_num_examples, check_same_layout

DEFAULT_MAX_UPDATES = 256


class CollectingStrategy(Strategy):
    """Keeps every update of the round; subclasses define ``_aggregate``.

    Parameters:
        max_updates: most updates accepted in one round, >= 1 (default 256).
    """

    needs_every_update: ClassVar[bool] = True
    max_updates: ClassVar[int | None] = DEFAULT_MAX_UPDATES

    def __init__(self, max_updates: int = DEFAULT_MAX_UPDATES) -> None:
        # an instance attribute: the class attribute is the default, this the configured cap
        self.max_updates = check_int(self.name, "max_updates", max_updates, low=1)
        self._global: Adapter | None = None
        self._updates: list[Adapter] = []
        self._weights: list[float] = []

    def begin_round(self, server_round: int, global_adapter: Adapter) -> None:
        self._global = global_adapter
        self._updates, self._weights = [], []

    def _check_update(self, update: Adapter) -> None:
        """Refuse an update that cannot be aggregated (default: the global's layout)."""
        assert self._global is not None
        check_same_layout(update, self._global)

    def accumulate(self, update: Adapter, num_examples: int) -> None:
        if self._global is None:
            raise AggregationError("accumulate() before begin_round()")
        weight = check_num_examples(num_examples)
        self._check_update(update)
        if len(self._updates) >= self.max_updates:
            raise AggregationError(
                f"strategy {self.name!r} keeps every update and is capped at max_updates={self.max_updates} "
                "per round; raise max_updates or sample fewer organizations"
            )
        # a private copy: the caller drops or reuses its arrays
        self._updates.append({k: np.array(v, dtype=np.float32, copy=True) for k, v in update.items()})
        self._weights.append(weight)

    def finish_round(self) -> Adapter:
        if self._global is None or not self._updates:
            raise AggregationError("no update was accumulated this round")
        try:
            return self._aggregate(self._global, self._updates, np.asarray(self._weights, dtype=np.float64))
        finally:
            self._global, self._updates, self._weights = None, [], []

    @abstractmethod
    def _aggregate(self, global_adapter: Adapter, updates: list[Adapter], weights: np.ndarray) -> Adapter:
        """The new global from all the round's updates and their example counts."""


def stacked(updates: list[Adapter], key: str, dtype: type = np.float64) -> np.ndarray:
    """One tensor of every update, stacked on a new first axis (one key at a time keeps the peak low)."""
    return np.stack([u[key] for u in updates]).astype(dtype, copy=False)
