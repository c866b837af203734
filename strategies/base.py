"""The streaming aggregation interface.

A round is ``begin_round(global)`` → ``accumulate(update, n)`` once per
accepted reply, in arrival order → ``finish_round()`` → new global adapter.
The coordinator drops each update right after ``accumulate``, so a strategy
that keeps O(P) running state keeps the coordinator's memory flat in the
number of replies. A strategy that mathematically needs every update at once
(median, Krum) sets ``needs_every_update`` and ``max_updates``.

``state_dict`` / ``load_state_dict`` hold whatever must survive a coordinator
restart between rounds (server-optimizer moments, momentum); it is written
into every checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from protos.adapter import Adapter
from protos.lora_rank import reduce_adapter


class AggregationError(RuntimeError):
    """A round cannot produce a new global adapter (e.g. no update accepted)."""


class Strategy(ABC):
    #: the name used in run configs and scenario files
    name: ClassVar[str]
    #: True when finish_round needs every update at once (memory grows with N)
    needs_every_update: ClassVar[bool] = False
    #: cap on updates per round for such strategies (None: unbounded)
    max_updates: ClassVar[int | None] = None
    #: which LoRA factors organizations train, and which they send up to be
    #: aggregated (the rest stay local): FFA-LoRA trains and sends B only,
    #: FedSA-LoRA shares A and keeps B local.
    factor_plan: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("lora_A", "lora_B"),
        "share": ("lora_A", "lora_B"),
    }
    #: how an organization maps the rank-R global to its own rank
    #: ("none": every organization must train rank R; see protos/lora_rank.py)
    rank_reduction: ClassVar[str] = "none"

    def configure_train(self, server_round: int) -> dict[str, Any]:
        """Extra round-config entries sent to the organizations (e.g. FedProx's
        ``proximal_mu``); keys are RoundConfig fields (protos/round_config.py)."""
        return {}

    @property
    def supports_heterogeneous_ranks(self) -> bool:
        return self.rank_reduction != "none"

    def adapter_for_rank(self, global_adapter: Adapter, rank: int) -> Adapter:
        """The global adapter as an organization training at ``rank`` starts from it —
        exactly what the organization computes itself under the contract."""
        return reduce_adapter(global_adapter, rank, self.rank_reduction)

    @abstractmethod
    def begin_round(self, server_round: int, global_adapter: Adapter) -> None:
        """Start accumulating updates relative to ``global_adapter``."""

    @abstractmethod
    def accumulate(self, update: Adapter, num_examples: int) -> None:
        """Fold in one organization's trained adapter; it is not kept."""

    @abstractmethod
    def finish_round(self) -> Adapter:
        """The new global adapter. Raises AggregationError if nothing was accumulated."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays that must survive a restart between rounds."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, got keys {sorted(state)[:3]}")
