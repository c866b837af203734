"""Run config and scenario validation: every bad value is named."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server.job_config import JobConfig, JobConfigError
from simulations.scenario import ScenarioError, builtin_scenarios, load_scenario, parse_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_every_job_key_can_be_overridden_by_flwr_run() -> None:
    """The SuperLink refuses run-config overrides for keys absent from pyproject."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    fields = {f.replace("_", "-") for f in JobConfig.__dataclass_fields__}
    assert fields == set(config)
    assert JobConfig.from_run_config(config).lora.target_modules == ("q_proj", "v_proj")


def test_booleans_must_say_true_or_false() -> None:
    assert JobConfig.from_run_config({"secure-aggregation": "false", "min-nodes": 2}).secure_aggregation is False
    with pytest.raises(JobConfigError, match="secure-aggregation.*true or false"):
        JobConfig.from_run_config({"secure-aggregation": "maybe"})


def test_unknown_key_lists_valid_ones() -> None:
    with pytest.raises(JobConfigError, match="unknown run-config key 'num-round'.*num-rounds"):
        JobConfig.from_run_config({"num-round": 3})


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("num-rounds", 0, "num-rounds"),
        ("fraction-train", 1.5, "fraction-train"),
        ("update-encoding", "bf16", "update-encoding"),
        ("lora-r", 0, "rank"),
        ("lora-targets", " , ", "target_modules"),
        ("num-rounds", 2.5, "whole number"),
        ("learning-rate", "fast", "expected float"),
    ],
)
def test_bad_values_are_named(key: str, value: object, fragment: str) -> None:
    with pytest.raises(JobConfigError, match=fragment):
        JobConfig.from_run_config({key: value})


def test_builtin_scenarios_load() -> None:
    assert {"demo", "qa", "tiny"} <= set(builtin_scenarios())
    demo = load_scenario("demo")
    assert demo.num_organizations == 3 and demo.job_config().model == "smollm2-135m"


def test_bad_scenarios(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="built-in"):
        load_scenario("no-such-scenario")
    bad = tmp_path / "bad.yaml"
    bad.write_text("num-organizations: 2\nrun-config: {num-rounds: -1}\n")
    with pytest.raises(ScenarioError, match="num-rounds"):
        load_scenario(str(bad))
    bad.write_text("num-organisations: 2\n")
    with pytest.raises(ScenarioError, match="unknown keys"):
        load_scenario(str(bad))
    bad.write_text("num-organizations: [\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(str(bad))
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario(str(tmp_path / "missing.yaml"))


def test_overrides_parse_yaml_scalars() -> None:
    assert parse_overrides(["num-rounds=3", "model=tiny-llama", "learning-rate=1e-3"]) == {
        "num-rounds": 3, "model": "tiny-llama", "learning-rate": 1e-3}
    with pytest.raises(ScenarioError):
        parse_overrides(["nonsense"])
