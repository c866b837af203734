"""Each family of strategies through the real round loop (Simulation Engine, tiny model, 1 round).

Unit tests check the math; this checks the plumbing around it: factor plans
(FFA-LoRA sends B only, FedSA-LoRA keeps B local), heterogeneous ranks (each
organization trains its own rank and the coordinator accepts it), server
optimizers and robust strategies fed by real replies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from protos.adapter import adapter_layout, init_adapter
from runtime.base_model import model_config
from server.checkpoint import CheckpointStore
from server.job_config import JobConfig
from simulations.runner import run_scenario
from simulations.scenario import Scenario

pytestmark = pytest.mark.slow

ORGS = 3


def run(tmp_path: Path, **settings: object) -> tuple[dict, CheckpointStore, JobConfig]:
    base = dict(model="tiny-llama", job_id="e2e", num_rounds=1, min_nodes=ORGS, local_steps=2, batch_size=4,
                max_length=96, eval_max_examples=4, sim_max_records=24, learning_rate=1e-2, lora_r=8,
                lora_alpha=16.0, run_dir=str(tmp_path))
    base.update(settings)
    cfg = JobConfig(**base)  # type: ignore[arg-type]
    cfg.validate()
    run_scenario(Scenario(name="e2e", num_organizations=ORGS, run_config={}), cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["history"][1]["accepted"]) == ORGS, report["history"][1]["rejected"]
    return report, CheckpointStore(cfg.checkpoint_dir), cfg


def initial(cfg: JobConfig) -> dict[str, np.ndarray]:
    return init_adapter(adapter_layout(model_config(cfg.model), cfg.lora), cfg.seed)


def test_ffa_lora_trains_b_only(tmp_path: Path) -> None:
    _, store, cfg = run(tmp_path, strategy="ffa-lora")
    final, start = store.latest().adapter, initial(cfg)  # type: ignore[union-attr]
    for name, value in final.items():
        assert np.array_equal(value, start[name]) == ("lora_A" in name), name


def test_fedsa_lora_shares_a_and_keeps_b_local(tmp_path: Path) -> None:
    _, store, cfg = run(tmp_path, strategy="fedsa-lora")
    final, start = store.latest().adapter, initial(cfg)  # type: ignore[union-attr]
    for name, value in final.items():
        assert np.array_equal(value, start[name]) == ("lora_B" in name), name


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_heterogeneous_ranks_are_accepted(tmp_path: Path, strategy: str) -> None:
    report, store, cfg = run(tmp_path, strategy=strategy, sim_ranks="2,4,8")
    final = store.latest().adapter  # type: ignore[union-attr]
    assert all(v.shape[0] == 8 for k, v in final.items() if "lora_A" in k)
    assert any(np.abs(v).sum() > 0 for k, v in final.items() if "lora_B" in k)


@pytest.mark.parametrize("strategy,params", [("fedadam", ""), ("fedprox", "mu=0.1"), ("krum", "num_malicious=0"),
                                             ("exact-lora", "residual=true")])
def test_server_side_strategies_complete_a_round(tmp_path: Path, strategy: str, params: str) -> None:
    _, store, cfg = run(tmp_path, strategy=strategy, strategy_params=params)
    latest = store.latest()
    assert latest is not None and latest.round == 1
    assert any(np.abs(v).sum() > 0 for k, v in latest.adapter.items() if "lora_B" in k)
