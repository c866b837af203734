"""The whole loop on Flower's Simulation Engine (Ray), tiny model.

* a 2-round job of 3 virtual organizations: report, checkpoints, export;
* a coordinator stopped after round 1 and started again continues at round 2
  from the saved state and ends on the very same adapter, byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from server.checkpoint import CheckpointStore
from server.job_config import JobConfig
from simulations.runner import run_scenario
from simulations.scenario import Scenario

pytestmark = pytest.mark.slow

ORGS = 3


def job(run_dir: Path) -> JobConfig:
    return JobConfig(model="tiny-llama", job_id="sim-test", num_rounds=2, min_nodes=ORGS, local_steps=2,
                     batch_size=4, max_length=96, eval_max_examples=8, sim_max_records=30,
                     learning_rate=5e-3, run_dir=str(run_dir))


def simulate(cfg: JobConfig, observer: Any = None) -> None:
    run_scenario(Scenario(name="test", num_organizations=ORGS, run_config={}), cfg, observer)


class CoordinatorStopped(Exception):
    """Stands in for the coordinator dying between two rounds."""


class Recorder:
    def __init__(self, crash_at: int | None = None) -> None:
        self.started: list[int] = []
        self.crash_at = crash_at

    def round_started(self, server_round: int, sampled: int) -> None:
        if server_round == self.crash_at:
            raise CoordinatorStopped(f"coordinator stopped before round {server_round}")
        self.started.append(server_round)

    def reply(self, server_round: int, org: str, accepted: bool, detail: str) -> None:
        assert accepted, detail

    def round_finished(self, server_round: int, summary: dict[str, Any]) -> None:
        pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    recorder = Recorder()
    simulate(job(run_dir), recorder)
    assert recorder.started == [1, 2]
    return run_dir


def test_report_has_base_and_specialist_per_organization(finished: Path) -> None:
    report = json.loads((finished / "report.json").read_text())
    assert sorted(report["organizations"]) == [f"org-{i}" for i in range(ORGS)]
    for metrics in report["organizations"].values():
        for side in ("base", "specialist"):
            assert {"accuracy", "perplexity", "num_examples"} <= set(metrics[side])
    assert [h["round"] for h in report["history"]] == [0, 1, 2]
    assert all(len(h["accepted"]) == ORGS for h in report["history"][1:])
    assert (finished / "learning_curve.png").stat().st_size > 1000


def test_exported_specialist_loads_in_peft_and_equals_the_checkpoint(finished: Path) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    from runtime.base_model import load_model

    latest = CheckpointStore(finished / "checkpoints").latest()
    assert latest is not None and latest.round == 2
    model = PeftModel.from_pretrained(load_model("tiny-llama"), finished / "specialist")
    loaded = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert sorted(loaded) == sorted(latest.adapter)
    for name, value in latest.adapter.items():
        assert np.array_equal(loaded[name].numpy(), value)
    assert any(np.abs(v).sum() > 0 for k, v in latest.adapter.items() if "lora_B" in k), "training moved nothing"
    provenance = json.loads((finished / "specialist" / "provenance.json").read_text())
    assert provenance["rounds"] == 2 and provenance["num_organizations"] == ORGS


def test_restart_continues_at_the_next_round_and_ends_identical(finished: Path, tmp_path: Path) -> None:
    cfg = job(tmp_path)
    with pytest.raises(CoordinatorStopped, match="stopped before round 2"):
        simulate(cfg, Recorder(crash_at=2))
    store = CheckpointStore(cfg.checkpoint_dir)
    assert store.rounds()[-1] == 1

    resumed = Recorder()
    simulate(cfg, resumed)
    assert resumed.started == [2], "a resumed job must not redo round 1"
    history = json.loads((tmp_path / "report.json").read_text())["history"]
    assert [h["round"] for h in history] == [0, 1, 2]

    expected = CheckpointStore(finished / "checkpoints").latest()
    got = store.latest()
    assert expected is not None and got is not None
    for name, value in expected.adapter.items():
        assert np.array_equal(got.adapter[name], value), f"{name} differs after resume"


def test_no_process_left_behind(finished: Path) -> None:
    leftovers = [p.name() for p in psutil.Process().children(recursive=True) if p.is_running()
                 and p.status() != psutil.STATUS_ZOMBIE]
    assert not [name for name in leftovers if "ray" in name or "raylet" in name or "gcs" in name], leftovers
