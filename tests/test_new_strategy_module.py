"""Adding a strategy is adding one module: nothing else is edited.

The module below is written to a temporary directory put on the package's
``__path__`` (a module dropped into strategies/ is found the same way), chosen
by name in a run config, and run through a real round. It is removed again
afterwards, so the other tests see the built-in strategies only.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import strategies
from server.job_config import JobConfig, JobConfigError
from strategies import STRATEGIES, AggregationError, build_strategy
from strategies.registry import heterogeneous_rank_strategies, linear_strategies

NAME, MODULE = "weird-mean", "weird_mean"

# the whole of what a contributor writes (besides its test)
SOURCE = '''
"""Weird mean: the example-weighted mean of the adapters, scaled by a factor."""

from __future__ import annotations

import numpy as np

from protos.adapter import Adapter
from strategies.fedavg import FedAvg
from strategies.registry import register_strategy


@register_strategy("weird-mean")
class WeirdMean(FedAvg):
    """The example-weighted mean times ``factor`` (still linear in the mean).

    Parameters:
        factor: multiplies the mean (default 0.5).
    """

    def __init__(self, factor: float = 0.5) -> None:
        super().__init__()
        self.factor = float(factor)

    def finish_round(self) -> Adapter:
        return {k: (self.factor * v.astype(np.float64)).astype(np.float32) for k, v in super().finish_round().items()}
'''

A, B = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"


def adapter(value: float) -> dict[str, np.ndarray]:
    return {A: np.full((2, 3), value, np.float32), B: np.full((4, 2), value, np.float32)}


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Path]:
    """strategies/ extended by one module in ``tmp_path``; afterwards the registry is as before."""
    before = STRATEGIES.names()
    assert NAME not in before
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(strategies, "__path__", [*strategies.__path__, str(tmp_path)])
            yield tmp_path
    finally:
        # the path is restored first, so the scan below cannot import the module again
        if NAME in STRATEGIES:
            STRATEGIES.unregister(NAME)
        sys.modules.pop(f"strategies.{MODULE}", None)
        if hasattr(strategies, MODULE):
            delattr(strategies, MODULE)
    assert STRATEGIES.names() == before
    assert f"strategies.{MODULE}" not in sys.modules


def test_a_new_strategy_module_is_selected_by_name_from_a_run_config(plugin: Path) -> None:
    cfg = JobConfig.from_run_config({"strategy": NAME})
    strategy = cfg.build_strategy()
    assert type(strategy).__name__ == "WeirdMean" and strategy.name == NAME
    assert type(strategy).__module__ == f"strategies.{MODULE}"

    # a real round: the example-weighted mean (1·1 + 3·3)/4 = 2.5, halved
    strategy.begin_round(1, adapter(0.0))
    strategy.accumulate(adapter(1.0), 1)
    strategy.accumulate(adapter(3.0), 3)
    result = strategy.finish_round()
    for key, value in result.items():
        assert value.dtype == np.float32 and np.array_equal(value, np.full_like(value, 1.25)), key
    # FedAvg, which it builds on, would give 2.5: the number is the new strategy's own
    fedavg = build_strategy("fedavg")
    fedavg.begin_round(1, adapter(0.0))
    fedavg.accumulate(adapter(1.0), 1)
    fedavg.accumulate(adapter(3.0), 3)
    assert np.array_equal(fedavg.finish_round()[A], np.full((2, 3), 2.5, np.float32))

    # its parameter comes through strategy-params, and an unknown one is refused naming the valid ones
    scaled = JobConfig.from_run_config({"strategy": NAME, "strategy-params": "factor=0.25"}).build_strategy()
    scaled.begin_round(1, adapter(0.0))
    scaled.accumulate(adapter(2.0), 5)
    assert np.array_equal(scaled.finish_round()[B], np.full((4, 2), 0.5, np.float32))
    with pytest.raises(JobConfigError, match="no parameter.*'mu'.*valid: \\['factor'\\]"):
        JobConfig.from_run_config({"strategy": NAME, "strategy-params": "mu=0.1"})


def test_what_the_coordinator_asks_is_read_from_the_new_class(plugin: Path) -> None:
    assert NAME in STRATEGIES.names()
    cls = STRATEGIES.get(NAME)
    assert cls.linear and not cls.needs_every_update and cls.max_updates is None
    assert cls.family == "classic"  # inherited from FedAvg: listed with the classic strategies
    assert NAME in linear_strategies() and NAME not in heterogeneous_rank_strategies()
    # listed among the valid names, and in the advice of a strategy that refuses secure aggregation
    with pytest.raises(ValueError, match=f"valid: .*'{NAME}'"):
        build_strategy("no-such-strategy")
    with pytest.raises(AggregationError, match=f"use a linear strategy \\(.*{NAME}"):
        build_strategy("krum").secure_input()
    # linear, so the coordinator accepts it with secure aggregation and feeds it the unmasked mean
    cfg = JobConfig.from_run_config({"strategy": NAME, "secure-aggregation": True, "min-nodes": 2})
    strategy = cfg.build_strategy()
    assert strategy.secure_input().clip_norm == 0.0
    strategy.begin_round(1, adapter(0.0))
    strategy.accumulate_secure(adapter(2.5), weight_sum=4, count=2)
    assert np.array_equal(strategy.finish_round()[A], np.full((2, 3), 1.25, np.float32))
    # one rank for all: mixed simulated ranks are refused, naming the strategies that allow them
    with pytest.raises(JobConfigError, match="needs one rank for all; use .*hetlora"):
        JobConfig.from_run_config({"strategy": NAME, "lora-r": 8, "sim-ranks": "4,8"})
