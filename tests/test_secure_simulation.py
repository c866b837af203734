"""Secure aggregation on Flower's Simulation Engine (Ray), tiny model: the real
ClientApp answers the four exchanges, keeping its keys in the node's
context.state between messages, and a 1-round job ends on the same adapter as
the same job without secure aggregation, within the quantization error
(training is deterministic: same seeds, same data). So does a dp-fedavg job,
whose organizations clip and mask with weight 1 and whose noise is added once
to the unmasked sum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.checkpoint import CheckpointStore
from server.job_config import JobConfig
from simulations.runner import run_scenario
from simulations.scenario import Scenario

pytestmark = pytest.mark.slow

ORGS = 3


def _run(run_dir: Path, **settings: object):
    cfg = JobConfig(model="tiny-llama", job_id="secure-sim", num_rounds=1, min_nodes=ORGS, local_steps=2,
                    batch_size=4, max_length=96, eval_max_examples=8, sim_max_records=30, learning_rate=5e-3,
                    run_dir=str(run_dir), **settings)  # type: ignore[arg-type]
    run_scenario(Scenario(name="test", num_organizations=ORGS, run_config={}), cfg)
    latest = CheckpointStore(cfg.checkpoint_dir).latest()
    assert latest is not None and latest.round == 1
    return latest


def test_secure_simulation_equals_plain_simulation(tmp_path: Path) -> None:
    plain = _run(tmp_path / "plain")
    secure = _run(tmp_path / "secure", secure_aggregation=True)
    history = secure.run_state["history"][-1]
    assert len(history["accepted"]) == ORGS and history["rejected"] == []
    moved = 0.0
    for name, value in plain.adapter.items():
        # N = 3, clip 0.05: step 2^-33; the mean is within N·step·W/(2Σn) ≲ 1e-7 of the plain one
        np.testing.assert_allclose(secure.adapter[name], value, rtol=0, atol=1e-6)
        moved += float(np.abs(value).sum()) if "lora_B" in name else 0.0
    assert moved > 0, "training moved nothing"


def test_dp_fedavg_with_secure_aggregation_equals_the_plain_dp_simulation(tmp_path: Path) -> None:
    """Refused before: the real ClientApp clips (round config dp_clip, no local noise) and
    masks with weight 1; the coordinator adds the same noise draw (same noise_seed) to the
    unmasked sum as the plain path adds to the sum it clipped itself."""
    dp = dict(strategy="dp-fedavg", strategy_params="clip_norm=0.01,noise_multiplier=0.5,noise_seed=11")
    plain = _run(tmp_path / "plain", **dp)
    secure = _run(tmp_path / "secure", secure_aggregation=True, **dp)
    history = secure.run_state["history"][-1]
    assert len(history["accepted"]) == ORGS and history["rejected"] == []
    assert secure.run_state["privacy"] == plain.run_state["privacy"]
    for name, value in plain.adapter.items():
        np.testing.assert_allclose(secure.adapter[name], value, rtol=0, atol=1e-6)
