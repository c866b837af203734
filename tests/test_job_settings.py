"""Every setting is declared once (protos/job_settings.py); the rest is derived from it."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

from flwr.app import Message

from protos.job_settings import JOB, ROUND, SIMULATION, JobSettings, render_run_config, settings_of
from protos.records import CONFIG_RECORD, SIMULATION_RECORD
from protos.round_config import RoundConfig, SimulationSettings, StrategyInstructions
from server.job import Job
from server.job_config import JobConfig
from test_round_loop import ScriptedGrid, config, honest

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_run_config_block() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    start = text.index("[tool.flwr.app.config]")
    end = text.index("\n[", start + 1)
    return text[start:end].rstrip("\n") + "\n"


def test_pyproject_run_config_is_rendered_from_the_settings() -> None:
    """`make run-config` regenerates it; an edit by hand or a new setting without it fails here."""
    assert _pyproject_run_config_block() == render_run_config()
    parsed = tomllib.loads(render_run_config())["tool"]["flwr"]["app"]["config"]
    assert JobConfig.from_run_config(parsed) == JobConfig()


def test_every_setting_has_a_default_a_help_and_a_scope() -> None:
    for f in fields(JobSettings):
        assert f.metadata["scope"] in (JOB, ROUND, SIMULATION), f.name
        assert len(f.metadata["help"]) > 10, f"{f.name} has no help"
        assert f.name == f.name.lower() and "-" not in f.name


def test_the_round_config_is_the_round_scoped_settings_plus_the_strategys_instructions() -> None:
    expected = {f.name for f in settings_of(ROUND)} | {"server_round"} | {f.name for f in fields(StrategyInstructions)}
    assert {f.name for f in fields(RoundConfig)} == expected
    assert not {f.name for f in fields(RoundConfig)} & {f.name for f in settings_of(SIMULATION) + settings_of(JOB)}
    assert {f.name for f in fields(SimulationSettings)} == {f.name for f in settings_of(SIMULATION)}


def test_a_settings_value_reaches_the_organization_under_its_own_name(tmp_path: Path) -> None:
    cfg = config(tmp_path, local_steps=7, max_length=99, eval_max_examples=5, lora_r=4)
    sent = cfg.round_config(3)
    back = RoundConfig.from_record(sent.to_record())
    assert (back.local_steps, back.max_length, back.eval_max_examples, back.lora_r, back.server_round) == (7, 99, 5, 4, 3)


def test_a_deployed_organization_never_receives_simulation_settings(tmp_path: Path) -> None:
    """A SuperLink's grid (here scripted) is not Flower's InMemoryGrid: no simulation record, no sim_* key."""
    seen: list[Message] = []

    def recording(handler):  # type: ignore[no-untyped-def]
        def handle(message: Message) -> Message:
            seen.append(message)
            return handler(message)
        return handle

    grid = ScriptedGrid({1: recording(honest(0.1)), 2: recording(honest(0.3))})
    cfg = config(tmp_path, sim_attack="sign-flip:0.5", sim_dataset="construction-faq")
    Job(grid, cfg).run()
    assert seen, "no instruction was sent"
    for message in seen:
        records = message.content.config_records
        assert SIMULATION_RECORD not in records
        assert not [key for key in records[CONFIG_RECORD] if key.startswith("sim")]


def test_a_simulation_sends_the_simulation_settings_to_its_virtual_organizations(tmp_path: Path) -> None:
    from flwr.superlink.grid import InMemoryGrid

    class SimulatedGrid(ScriptedGrid, InMemoryGrid):  # scripted nodes, of the type Flower simulates with
        def __init__(self, handlers):  # type: ignore[no-untyped-def]
            ScriptedGrid.__init__(self, handlers)

    seen: list[Message] = []

    def recording(message: Message) -> Message:
        seen.append(message)
        return honest(0.1)(message)

    cfg = config(tmp_path, sim_attack="sign-flip:0.5", sim_dataset="construction-faq", min_nodes=1)
    Job(SimulatedGrid({1: recording}), cfg).run()
    assert seen
    for message in seen:
        sim = SimulationSettings.from_record(message.content.config_records[SIMULATION_RECORD])
        assert (sim.sim_attack, sim.sim_dataset) == ("sign-flip:0.5", "construction-faq")
