"""The registry: every strategy builds with its defaults, bad values name the parameter."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from strategies import STRATEGIES, Strategy, build_strategy

NAMES = ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median", "trimmed-mean", "krum",
         "norm-bounded", "exact-lora", "hetlora", "flexlora", "ffa-lora", "fedsa-lora", "dp-fedavg"]

BAD = [
    ("fedprox", "mu", -0.01), ("fedprox", "mu", float("nan")), ("fedprox", "mu", "0.1"),
    ("fedavgm", "server_learning_rate", 0.0), ("fedavgm", "server_momentum", 1.0),
    ("fedavgm", "server_momentum", -0.1),
    ("fedadam", "eta", 0.0), ("fedadam", "beta_1", 1.0), ("fedadam", "beta_2", -0.5), ("fedadam", "tau", 0.0),
    ("fedyogi", "eta", -1.0), ("fedyogi", "beta_2", 1.5), ("fedyogi", "tau", float("inf")),
    ("fedadagrad", "eta", 0.0), ("fedadagrad", "tau", -1e-3),
    ("median", "max_updates", 0), ("trimmed-mean", "beta", 0.5), ("trimmed-mean", "beta", -0.1),
    ("trimmed-mean", "max_updates", 2.5),
    ("krum", "num_malicious", -1), ("krum", "num_to_select", 0), ("krum", "num_malicious", True),
    ("norm-bounded", "clip_norm", 0.0), ("norm-bounded", "clip_norm", -1.0),
    ("exact-lora", "residual", "yes"), ("exact-lora", "max_updates", -3), ("flexlora", "max_updates", 0),
    ("dp-fedavg", "clip_norm", 0.0), ("dp-fedavg", "noise_multiplier", -1.0),
    ("dp-fedavg", "noise_placement", "client"), ("dp-fedavg", "noise_seed", -2),
]


def test_every_name_is_registered_in_family_order() -> None:
    assert list(STRATEGIES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_defaults_and_documents_its_parameters(name: str) -> None:
    strategy = build_strategy(name)
    assert isinstance(strategy, Strategy) and strategy.name == name
    doc = inspect.getdoc(type(strategy)) or ""
    assert "Parameters" in doc
    for param in inspect.signature(type(strategy).__init__).parameters:
        if param != "self":
            assert param in doc, f"{name}: parameter {param} is not documented"
    assert strategy.configure_train(1) == ({"proximal-mu": 0.01} if name == "fedprox" else {})
    assert strategy.max_updates == (256 if strategy.needs_every_update else None)


@pytest.mark.parametrize("name,param,value", BAD)
def test_bad_values_name_the_parameter(name: str, param: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"'{param}'"):
        build_strategy(name, {param: value})


def test_accepted_values() -> None:
    assert build_strategy("krum", {"num_malicious": 2, "num_to_select": 3.0}).num_to_select == 3
    assert build_strategy("fedadam", {"eta": 1}).eta == 1.0
    assert build_strategy("trimmed-mean", {"beta": 0}).beta == 0.0
    assert build_strategy("median", {"max_updates": np.int64(8)}).max_updates == 8
    assert build_strategy("exact-lora", {"residual": True}).residual is True


def test_unknown_names_and_parameters() -> None:
    with pytest.raises(ValueError, match="valid: \\['fedavg', 'fedprox'"):
        build_strategy("fedmagic")
    with pytest.raises(ValueError, match="no parameter"):
        build_strategy("fedadam", {"eta_l": 0.1})  # the client learning rate is not the server's business
    assert type(build_strategy("Trimmed-Mean")).__name__ == "TrimmedMean"
