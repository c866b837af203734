"""Scenario files: a named, versionable description of a simulated federation.

A scenario is YAML with ``num-organizations``, an optional ``backend`` (Ray
resources per virtual organization) and a ``run-config`` whose keys are the
Flower run-config keys of pyproject.toml. Built-in scenarios live in
``simulations/scenarios/``; any other path is read as a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from server.job_config import JobConfig, JobConfigError


class ScenarioError(ValueError):
    """A scenario file that cannot be used, with the reason."""


@dataclass
class Scenario:
    name: str
    num_organizations: int
    run_config: dict[str, Any]
    description: str = ""
    backend: dict[str, Any] = field(default_factory=dict)

    def job_config(self, overrides: dict[str, Any] | None = None) -> JobConfig:
        merged = {**self.run_config, **(overrides or {})}
        try:
            return JobConfig.from_run_config(merged)
        except JobConfigError as err:
            raise ScenarioError(f"scenario {self.name!r}: {err}") from None


SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


def builtin_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str, *, simulated: bool = True) -> Scenario:
    """A built-in scenario or a .yaml file. ``simulated=False`` (a deployment's job file, for
    `silotune coordinator --scenario`): the organizations are real, ``num-organizations`` may be left out."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ScenarioError(f"scenario file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    else:
        if name_or_path not in builtin_scenarios():
            raise ScenarioError(f"no scenario {name_or_path!r}; built-in: {builtin_scenarios()}, or a .yaml path")
        text = (SCENARIO_DIR / f"{name_or_path}.yaml").read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ScenarioError(f"scenario {name_or_path!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"scenario {name_or_path!r} must be a mapping")
    allowed = {"name", "description", "num-organizations", "run-config", "backend"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ScenarioError(f"scenario {name_or_path!r}: unknown keys {unknown}; valid: {sorted(allowed)}")
    orgs = raw.get("num-organizations", None if simulated else 1)
    if not isinstance(orgs, int) or orgs < 1:
        raise ScenarioError(f"scenario {name_or_path!r}: num-organizations must be a positive integer")
    scenario = Scenario(
        name=str(raw.get("name", path.stem)),
        num_organizations=orgs,
        run_config=dict(raw.get("run-config") or {}),
        description=str(raw.get("description", "")),
        backend=dict(raw.get("backend") or {}),
    )
    scenario.job_config()  # validate now, not after Ray has started
    return scenario


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs from the command line, values parsed as YAML scalars."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ScenarioError(f"--set expects key=value, got {pair!r}")
        overrides[key.strip()] = _scalar(value)
    return overrides


def _scalar(text: str) -> Any:
    """A YAML scalar (numbers, booleans); anything YAML would read as a structure or refuses —
    a prompt template's ``{text}``, a ``[...]`` label list, a colon — is the text as typed."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    if value is None or isinstance(value, (dict, list)):
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string; on a command line it is a number
            return float(value)
        except ValueError:
            return value
    return value
