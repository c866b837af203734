"""The simulated attackers (clients/attacks.py): who attacks, what they send, and that
nothing but a virtual organization of a simulation can be made one."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

from clients import attacks
from server.job_config import SIM_ATTACKS, JobConfig, JobConfigError


def test_the_coordinator_and_the_clients_know_the_same_attacks() -> None:
    assert set(SIM_ATTACKS) == set(attacks.KINDS)


@pytest.mark.parametrize("spec", ["sign-flip", "sign-flip:0", "sign-flip:1.5", "poison:0.2", "scale10:x"])
def test_bad_specs_are_refused_by_name(spec: str) -> None:
    with pytest.raises(JobConfigError, match="sim-attack"):
        JobConfig(sim_attack=spec).validate()
    with pytest.raises(ValueError, match="sim-attack"):
        attacks.parse(spec)


def test_attackers_are_a_deterministic_share_of_the_partitions() -> None:
    chosen = attacks.attackers(10, 0.2, seed=0)
    assert len(chosen) == 2 and chosen == attacks.attackers(10, 0.2, seed=0)
    assert len(attacks.attackers(5, 0.2, seed=0)) == 1
    assert len(attacks.attackers(3, 0.05, seed=0)) == 1, "at least one attacker"


@pytest.mark.parametrize("kind,factor", [("sign-flip", -1.0), ("scale10", 10.0), ("flip10", -10.0)])
def test_poisoned_update(kind: str, factor: float) -> None:
    rng = np.random.default_rng(0)
    start = {"a": rng.standard_normal((4, 3)).astype(np.float32)}
    trained = {"a": start["a"] + rng.standard_normal((4, 3)).astype(np.float32) * 0.1}
    sent = attacks.poison(start, trained, kind)
    assert sent["a"].dtype == np.float32
    np.testing.assert_allclose(sent["a"] - start["a"], factor * (trained["a"] - start["a"]), rtol=1e-5, atol=1e-6)


def test_a_deployed_agent_is_never_an_attacker() -> None:
    start = {"a": np.zeros(3, np.float32)}
    trained = {"a": np.ones(3, np.float32)}
    deployed = {"silo-path": "/data/silo.jsonl", "org-name": "bank"}
    assert attacks.maybe_attack(deployed, "flip10:0.9", 0, start, trained) is trained
    virtual = {"partition-id": sorted(attacks.attackers(4, 0.5, 0))[0], "num-partitions": 4}
    assert attacks.maybe_attack(virtual, "", 0, start, trained) is trained
    np.testing.assert_array_equal(attacks.maybe_attack(virtual, "flip10:0.5", 0, start, trained)["a"], -10.0)


def test_the_client_app_sends_the_poisoned_update_of_its_honest_training() -> None:
    """Through the real round work (tiny model): an attacker trains honestly, then sends start − Δ."""
    from clients import round_work
    from protos import codec
    from protos.adapter import adapter_layout, init_adapter
    from protos.records import CONFIG_RECORD, SIMULATION_RECORD
    from runtime import base_model

    attacker = sorted(attacks.attackers(5, 0.2, seed=0))[0]
    honest_org = next(p for p in range(5) if p != attacker)

    def sent(partition: int, spec: str) -> dict[str, np.ndarray]:
        cfg = JobConfig(model="tiny-llama", job_id="attack", lora_r=4, local_steps=1, batch_size=2,
                        max_length=64, sim_max_records=20, learning_rate=0.05, sim_attack=spec)
        start = init_adapter(adapter_layout(base_model.model_config(cfg.model), cfg.lora), seed=0)
        start = {k: v + np.float32(0.01) for k, v in start.items()}  # B != 0, so A moves too
        content = codec.encode(start, kind=codec.Kind.Value("GLOBAL"), job_id=cfg.job_id, server_round=1,
                               fingerprint=base_model.fingerprint(cfg.model), lora=cfg.lora)
        content[CONFIG_RECORD] = cfg.round_config(1).to_record()
        content[SIMULATION_RECORD] = cfg.simulation_settings().to_record()
        reply = round_work.train(content, {"partition-id": partition, "num-partitions": 5}, RecordDict())
        return {k: v - start[k] for k, v in codec.decode(reply)[1].items()}  # Δ as sent

    honest_delta = sent(attacker, "")
    poisoned_delta = sent(attacker, "sign-flip:0.2")
    assert any(np.abs(d).max() > 0 for d in honest_delta.values()), "training moved nothing"
    for name, delta in honest_delta.items():
        np.testing.assert_allclose(poisoned_delta[name], -delta, rtol=1e-4, atol=1e-6)
    bystander = sent(honest_org, "sign-flip:0.2")
    assert all(np.array_equal(bystander[k], v) for k, v in sent(honest_org, "").items())
