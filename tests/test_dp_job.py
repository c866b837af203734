"""A differentially private job: budget stop, ledger in checkpoints, resume, provenance.

Scripted organizations (tests/test_round_loop.py) answer in-process: no Ray, fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Message

from protos.round_config import CONFIG_RECORD, RoundConfig
from server.app import run_job
from server.checkpoint import CheckpointStore
from server.job import Job
from server.job_config import JobConfig, JobConfigError
from strategies.accountant import RdpAccountant
from test_round_loop import ScriptedGrid, config, honest

DP = "clip_norm=1.0,noise_multiplier=1.0,noise_seed=7"


@pytest.fixture(autouse=True)
def _no_full_collections(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exchange collects cycles after each pull (~1 s each on a busy 2-core
    machine with transformers imported); memory is not what these tests measure."""
    import server.exchange

    monkeypatch.setattr(server.exchange.gc, "collect", lambda *args: 0)


def _epsilon(q: float, z: float, rounds: int, delta: float = 1e-5) -> float:
    accountant = RdpAccountant()
    accountant.step(q, z, rounds)
    return accountant.epsilon(delta)


def _grid(n: int = 3) -> ScriptedGrid:
    return ScriptedGrid({node: honest(0.01 * node) for node in range(1, n + 1)})


def test_the_job_stops_before_a_round_that_would_exceed_the_budget(tmp_path: Path, caplog) -> None:
    two, three = _epsilon(1.0, 1.0, 2), _epsilon(1.0, 1.0, 3)
    budget = (two + three) / 2
    cfg = config(tmp_path, min_nodes=3, num_rounds=5, strategy="dp-fedavg", strategy_params=DP,
                 dp_epsilon_max=budget)
    job = Job(_grid(), cfg)
    with caplog.at_level("ERROR", logger="silotune.server"):
        final = job.run()
    assert final.round == 2 and CheckpointStore(cfg.checkpoint_dir).rounds() == [0, 1, 2]
    assert "round 3 would bring ε to" in job.stop_reason and "dp-epsilon-max" in job.stop_reason
    assert "round 3 would bring" in caplog.text
    assert final.run_state["privacy"]["ledger"] == [{"q": 1.0, "noise_multiplier": 1.0, "steps": 2}]
    assert job.privacy.epsilon == two <= budget
    assert [h["privacy"]["epsilon"] for h in final.run_state["history"][1:]] == [_epsilon(1.0, 1.0, 1), two]
    # a restart does not sneak in another round
    again = Job(_grid(), cfg)
    assert again.run().round == 2 and again.stop_reason


def test_resume_continues_the_ledger_and_the_noise(tmp_path: Path) -> None:
    settings = dict(min_nodes=3, strategy="dp-fedavg", strategy_params=DP)
    straight = Job(_grid(), config(tmp_path / "straight", num_rounds=3, **settings)).run()
    Job(_grid(), config(tmp_path / "resumed", num_rounds=1, **settings)).run()
    resumed_job = Job(_grid(), config(tmp_path / "resumed", num_rounds=3, **settings))
    resumed = resumed_job.run()
    assert resumed.run_state["privacy"] == straight.run_state["privacy"]
    assert resumed.run_state["privacy"]["ledger"][0]["steps"] == 3
    assert resumed_job.privacy.epsilon == _epsilon(1.0, 1.0, 3)
    for key, value in straight.adapter.items():
        assert value.tobytes() == resumed.adapter[key].tobytes()
    # the noise is a function of (key, round): nothing of it is carried in the strategy state
    assert straight.strategy_state == resumed.strategy_state == {}
    assert straight.run_state["privacy"]["noise_key"]["source"] == "noise_seed"


def test_the_sampling_rate_is_sampled_over_online(tmp_path: Path) -> None:
    cfg = config(tmp_path, min_nodes=2, fraction_train=0.5, num_rounds=2, strategy="dp-fedavg", strategy_params=DP)
    final = Job(_grid(4), cfg).run()
    assert final.run_state["privacy"]["ledger"] == [{"q": 0.5, "noise_multiplier": 1.0, "steps": 2}]
    assert final.run_state["history"][-1]["privacy"]["epsilon"] == _epsilon(0.5, 1.0, 2)


def test_local_noise_is_asked_of_the_organizations(tmp_path: Path) -> None:
    seen: list[tuple[float, float]] = []

    def recording(delta: float):
        inner = honest(delta)

        def handle(message: Message) -> Message:
            cfg = RoundConfig.from_record(message.content.config_records[CONFIG_RECORD])
            if message.metadata.message_type == "train":
                seen.append((cfg.dp_clip, cfg.dp_noise))
            return inner(message)
        return handle

    cfg = config(tmp_path, min_nodes=2, fraction_train=0.5, strategy="dp-fedavg",
                 strategy_params="clip_norm=0.5,noise_multiplier=2.0,noise_placement=local")
    grid = ScriptedGrid({node: recording(0.01 * node) for node in range(1, 5)})
    final = Job(grid, cfg).run()
    assert seen == [(0.5, 2.0), (0.5, 2.0)]
    # the coordinator knows who took part: no amplification by sampling
    assert final.run_state["privacy"]["ledger"] == [{"q": 1.0, "noise_multiplier": 2.0, "steps": 1}]


def test_the_specialist_and_the_report_carry_epsilon(tmp_path: Path) -> None:
    cfg = config(tmp_path, min_nodes=3, num_rounds=2, strategy="dp-fedavg", strategy_params=DP)
    out = run_job(_grid(), cfg)
    provenance = json.loads((out / "provenance.json").read_text())
    dp = provenance["differential_privacy"]
    assert dp["epsilon"] == _epsilon(1.0, 1.0, 2) and dp["delta"] == 1e-5
    assert dp["noise_multiplier"] == 1.0 and dp["clip_norm"] == 1.0 and dp["noise_placement"] == "server"
    assert dp["charged_rounds"] == 2 and "Mironov" in dp["accountant"]
    card = (out / "README.md").read_text()
    assert f"(ε = {dp['epsilon']:.3g}, δ = 1e-05) per organization" in card
    assert "noise at the server, clipped by the coordinator" in card and "secure-aggregation" not in card
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["differential_privacy"]["epsilon"] == dp["epsilon"]
    plain = run_job(_grid(), config(tmp_path / "plain", min_nodes=3))
    assert "differential_privacy" not in json.loads((plain / "provenance.json").read_text())


def test_run_config_keys() -> None:
    cfg = JobConfig.from_run_config({"strategy": "dp-fedavg", "dp-epsilon-max": 8.0, "dp-delta": 1e-6})
    assert (cfg.dp_epsilon_max, cfg.dp_delta) == (8.0, 1e-6)
    with pytest.raises(JobConfigError, match="dp-epsilon-max.*differentially private"):
        JobConfig.from_run_config({"strategy": "fedavg", "dp-epsilon-max": 8.0})
    for key, value in [("dp-delta", 0.0), ("dp-delta", 1.0), ("dp-epsilon-max", -1.0)]:
        with pytest.raises(JobConfigError, match=key):
            JobConfig.from_run_config({"strategy": "dp-fedavg", key: value})
    with pytest.raises(JobConfigError, match="noise_placement"):
        JobConfig.from_run_config({"strategy": "dp-fedavg", "strategy-params": "noise_placement=everywhere"})
    # with secure aggregation the noise goes once on the secure sum (tests/test_secure_dp.py);
    # local noise on top of it is refused by name
    JobConfig.from_run_config({"strategy": "dp-fedavg", "secure-aggregation": True})
    with pytest.raises(JobConfigError, match="secure-aggregation.*noise_placement='server'"):
        JobConfig.from_run_config({"strategy": "dp-fedavg", "secure-aggregation": True,
                                   "strategy-params": "noise_placement=local"})
