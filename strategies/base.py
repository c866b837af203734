"""The streaming aggregation interface.

A round is ``begin_round(global)`` → ``accumulate(update, n)`` once per
accepted reply, in arrival order → ``finish_round()`` → new global adapter.
The coordinator calls ``accumulate_checked``, which checks the update's values
(finite, norm under the bound) before it calls ``accumulate``.
The coordinator drops each update right after ``accumulate``, so a strategy
that keeps O(P) running state keeps the coordinator's memory flat in the
number of replies. A strategy that mathematically needs every update at once
(median, Krum) sets ``needs_every_update`` and ``max_updates``.

A strategy whose new global depends on the round's updates only through
their example-weighted mean (FedAvg and the server optimizers built on it,
FFA-LoRA, FedSA-LoRA) sets ``linear``: secure aggregation, which shows the
coordinator that mean and nothing else, hands it over through
``accumulate_secure``. DP-FedAvg takes instead the unweighted sum of deltas
each clipped by its organization (``secure_input`` says so; the sum arrives
through ``accumulate_secure_sum``). The others (robust, exact-product,
heterogeneous-rank strategies) need each update and refuse secure aggregation.

A concrete strategy registers itself in its own module with
``@register_strategy("its-name")`` (strategies/registry.py), which sets
``name``; the coordinator learns everything else about it (``linear``,
``needs_every_update``, ``rank_reduction``, ``family``) from these class
attributes, never from a list of names.

``state_dict`` / ``load_state_dict`` hold whatever must survive a coordinator
restart between rounds (server-optimizer moments, momentum); it is written
into every checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from protos.adapter import Adapter
from protos.registry import Registry
from strategies.lora_rank import reduce_adapter

#: the families strategies are listed by (error messages, ``STRATEGIES.names()``), in that order
FAMILIES = ("classic", "robust", "lora", "private")


class AggregationError(RuntimeError):
    """A round cannot produce a new global adapter (e.g. no update accepted)."""


@dataclass(frozen=True)
class SecureInput:
    """What each organization masks under secure aggregation, as the strategy needs it.

    ``clip_norm`` 0: its delta weighted by its example count; the coordinator
    unmasks the example-weighted mean (``Strategy.accumulate_secure``).
    ``clip_norm`` C > 0: its delta clipped to L2 norm C, with weight 1 (each
    organization counts once); the coordinator unmasks the plain sum of the
    clipped deltas (``Strategy.accumulate_secure_sum``): DP-FedAvg."""

    clip_norm: float = 0.0

    @property
    def uniform(self) -> bool:
        return self.clip_norm > 0


class Strategy(ABC):
    #: the name used in run configs and scenario files; set by ``@register_strategy``
    name: ClassVar[str]
    #: one of FAMILIES (another value is listed after them)
    family: ClassVar[str] = "other"
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
    #: True when finish_round depends on the updates only through their
    #: example-weighted mean and total weight (then secure aggregation works)
    linear: ClassVar[bool] = False
    #: how an organization maps the rank-R global to its own rank
    #: ("none": every organization must train rank R; see strategies/lora_rank.py)
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

    def accumulate_checked(self, update: Adapter, num_examples: int, *, reference: Adapter | None,
                           norm_bound: float | None = None) -> float:
        """Check the update's values, then fold it in; returns the L2 norm of
        ``update − reference``. The checks are ``codec.check_values``'s, with its
        rejections (UpdateRejected NON_FINITE, NORM_BOUND) and its norm to the bit,
        and they decide before the strategy's state changes: a refused update
        leaves it as it was. The norm's slices are shared among the kernels'
        threads (strategies/checked_sum.py)."""
        # imported here: it brings protos.codec (and Flower), which `import strategies` does not need
        from strategies.checked_sum import checked_norm

        norm = checked_norm(update, reference, norm_bound)
        self.accumulate(update, num_examples)
        return norm

    @abstractmethod
    def finish_round(self) -> Adapter:
        """The new global adapter. Raises AggregationError if nothing was accumulated."""

    def secure_input(self) -> SecureInput:
        """What organizations mask for this strategy under secure aggregation;
        AggregationError, saying why, when it cannot work with it."""
        if not self.linear:
            raise self._needs_each_update()
        return SecureInput()

    def _needs_each_update(self) -> AggregationError:
        linear = [name for name, cls in STRATEGIES.items() if cls.linear]
        # non-linear strategies with their own secure input (dp-fedavg: a sum of clipped deltas)
        own_input = [name for name, cls in STRATEGIES.items()
                     if not cls.linear and cls.secure_input is not Strategy.secure_input]
        return AggregationError(
            f"strategy {self.name!r} needs every individual update, which secure aggregation hides; "
            f"use a linear strategy ({', '.join(linear)}), {', '.join(own_input + [''])}"
            "or turn secure-aggregation off"
        )

    def accumulate_secure(self, mean: Adapter, weight_sum: int, count: int) -> None:
        """Fold in a securely aggregated round: the example-weighted ``mean`` of
        ``count`` updates whose weights sum to ``weight_sum``. For a linear
        strategy this is exactly what ``count`` accumulate() calls would do."""
        if not self.linear:
            raise self._needs_each_update()
        if count < 1 or weight_sum < 1:
            raise AggregationError("a secure aggregate of no update")
        self.accumulate(mean, weight_sum)

    def accumulate_secure_sum(self, clipped_sum: Adapter, count: int) -> None:
        """Fold in the unweighted sum of ``count`` deltas (update − global), each
        clipped by its organization to ``secure_input().clip_norm``; only for a
        strategy whose ``secure_input`` is uniform."""
        raise AggregationError(f"strategy {self.name!r} takes an example-weighted mean under secure "
                               "aggregation, not a sum of clipped deltas")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays that must survive a restart between rounds."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, got keys {sorted(state)[:3]}")


def _family_order(name: str, cls: type[Strategy]) -> tuple[int, str, str]:
    family = getattr(cls, "family", "")
    rank = FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)
    return rank, family, name


#: every strategy, by name; a strategy joins it in its own module with
#: ``@register_strategy("name")`` (strategies/registry.py reads it)
STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "strategies", order=_family_order, name_attr="name")
