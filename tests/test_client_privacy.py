"""DP at the organization: clip the shared delta, add N(0, (zC)²), keep local factors as they are."""

from __future__ import annotations

import numpy as np
import pytest

from clients.privacy import noise_generator, privatize
from protos.job_settings import JobSettings
from protos.round_config import RoundConfig, round_config


def _adapters(scale: float) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    start = {"m.lora_A": rng.standard_normal((300, 200)).astype(np.float32),
             "m.lora_B": rng.standard_normal((200, 300)).astype(np.float32)}
    trained = {k: v + np.float32(scale) for k, v in start.items()}
    return start, trained


def test_clip_only() -> None:
    start, trained = _adapters(0.01)   # delta norm 0.01·√120000 ≈ 3.46
    out = privatize(start, trained, ["m.lora_A", "m.lora_B"], 1.0, 0.0, np.random.default_rng(0))
    norm = np.sqrt(sum(float(np.sum((out[k].astype(np.float64) - start[k]) ** 2)) for k in start))
    assert norm == pytest.approx(1.0, rel=1e-4)
    small = privatize(start, trained, ["m.lora_A", "m.lora_B"], 10.0, 0.0, np.random.default_rng(0))
    assert all(np.allclose(small[k], trained[k]) for k in start)   # under the bound: unchanged


def test_noise_std_and_local_factors() -> None:
    start, trained = _adapters(0.0)
    z, clip = 0.7, 0.5
    out = privatize(start, trained, ["m.lora_B"], clip, z, np.random.default_rng(42))
    assert out["m.lora_A"] is trained["m.lora_A"]   # a factor kept local is not touched
    noise = (out["m.lora_B"].astype(np.float64) - start["m.lora_B"]).ravel()
    expected = z * clip
    assert abs(noise.std() - expected) < 4 * expected / np.sqrt(2 * noise.size)
    assert abs(noise.mean()) < 4 * expected / np.sqrt(noise.size)
    with pytest.raises(ValueError):
        privatize(start, trained, ["m.lora_B"], 0.0, 1.0, np.random.default_rng(0))


def test_noise_is_secret_unless_the_node_sets_a_seed() -> None:
    draw = lambda cfg: noise_generator(cfg, 3, "org-a").standard_normal(4)  # noqa: E731
    assert not np.array_equal(draw({}), draw({}))
    assert np.array_equal(draw({"dp-noise-seed": 5}), draw({"dp-noise-seed": 5}))
    assert not np.array_equal(draw({"dp-noise-seed": 5}), noise_generator({"dp-noise-seed": 5}, 4, "org-a").standard_normal(4))


def test_round_config_carries_the_settings() -> None:
    settings = JobSettings(job_id="j", model="tiny-llama", lora_r=4, lora_alpha=8.0, lora_targets="q_proj")
    cfg = round_config(settings, 1, dp_clip=0.5, dp_noise=1.1)
    back = RoundConfig.from_record(cfg.to_record())
    assert (back.dp_clip, back.dp_noise) == (0.5, 1.1)
    assert round_config(settings, 1).dp_clip == 0.0


def test_the_train_path_clips_and_noises_what_is_sent() -> None:
    """Through the real round work (tiny model, one step): the delta sent is clipped to C,
    the noise is N(0, (zC)²) on top, and nothing changes when DP is off."""
    import dataclasses

    from flwr.app import RecordDict

    from clients import round_work
    from protos import codec
    from protos.adapter import adapter_layout, init_adapter
    from protos.records import CONFIG_RECORD, SIMULATION_RECORD
    from runtime import base_model
    from server.job_config import JobConfig

    cfg = JobConfig(model="tiny-llama", job_id="dp", lora_r=4, local_steps=1, batch_size=2,
                    max_length=64, sim_max_records=20, learning_rate=0.05)
    start = init_adapter(adapter_layout(base_model.model_config(cfg.model), cfg.lora), seed=0)
    start = {k: v + np.float32(0.01) for k, v in start.items()}
    node = {"partition-id": 0, "num-partitions": 3, "dp-noise-seed": 11}

    def sent_delta(dp_clip: float, dp_noise: float) -> dict[str, np.ndarray]:
        content = codec.encode(start, kind=codec.Kind.Value("GLOBAL"), job_id=cfg.job_id, server_round=1,
                               fingerprint=base_model.fingerprint(cfg.model), lora=cfg.lora)
        content[CONFIG_RECORD] = dataclasses.replace(cfg.round_config(1), dp_clip=dp_clip,
                                                     dp_noise=dp_noise).to_record()
        content[SIMULATION_RECORD] = cfg.simulation_settings().to_record()
        _, update = codec.decode(round_work.train(content, node, RecordDict()))
        return {k: v.astype(np.float64) - start[k] for k, v in update.items()}

    def norm(delta: dict[str, np.ndarray]) -> float:
        return float(np.sqrt(sum(np.sum(d * d) for d in delta.values())))

    raw = sent_delta(0.0, 0.0)
    clip = norm(raw) / 4
    clipped = sent_delta(clip, 0.0)
    assert norm(clipped) == pytest.approx(clip, rel=1e-3)
    for key, value in raw.items():
        np.testing.assert_allclose(clipped[key], value / 4, atol=1e-6)
    noised = sent_delta(clip, 2.0)
    noise = np.concatenate([(noised[k] - clipped[k]).ravel() for k in raw])
    assert abs(noise.std() - 2.0 * clip) < 5 * 2.0 * clip / np.sqrt(2 * noise.size)


def test_under_local_dp_a_deployed_organization_sends_no_unnoised_metric(tmp_path) -> None:
    """The same locally noised round: a deployed agent (its policy, clients/policy.py) sends only
    data-independent metrics and an example count of 1, and charges its own ε ledger; a virtual
    organization of a simulation (the simulation policy) still sends its loss, for learning curves."""
    import dataclasses
    import json

    from flwr.app import RecordDict

    from clients import round_work
    from clients.policy import DATA_INDEPENDENT_METRICS
    from clients.privacy import LEDGER_FILE, EpsilonLedger
    from clients.silo.corpora import load_bbc_news
    from protos import codec
    from protos.adapter import adapter_layout, init_adapter
    from protos.records import CONFIG_RECORD, SIMULATION_RECORD
    from runtime import base_model
    from server.job_config import JobConfig

    cfg = JobConfig(model="tiny-llama", job_id="dp", lora_r=4, local_steps=1, batch_size=2,
                    max_length=64, sim_max_records=20, learning_rate=0.05)
    start = init_adapter(adapter_layout(base_model.model_config(cfg.model), cfg.lora), seed=0)
    content = codec.encode(start, kind=codec.Kind.Value("GLOBAL"), job_id=cfg.job_id, server_round=1,
                           fingerprint=base_model.fingerprint(cfg.model), lora=cfg.lora)
    content[CONFIG_RECORD] = dataclasses.replace(cfg.round_config(1), dp_clip=0.5, dp_noise=1.5).to_record()
    silo = tmp_path / "bank.jsonl"
    silo.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in load_bbc_news()[:30]))

    deployed = {"silo-path": str(silo), "org-name": "bank", "state-dir": str(tmp_path)}
    header, _ = codec.decode(round_work.train(content, deployed, RecordDict()))
    assert set(header.metrics) <= DATA_INDEPENDENT_METRICS and "train_loss" not in header.metrics
    assert header.num_examples == 1
    assert [c["noise_multiplier"] for c in EpsilonLedger(tmp_path / LEDGER_FILE).charges()] == [1.5]

    content[SIMULATION_RECORD] = cfg.simulation_settings().to_record()
    header, _ = codec.decode(round_work.train(content, {"partition-id": 0, "num-partitions": 3}, RecordDict()))
    assert "train_loss" in header.metrics and header.num_examples > 1


def test_an_error_reply_carries_the_errors_type_not_its_text() -> None:
    """Flower sends an exception's text verbatim; a silo error can quote a record."""
    from clients import app as client_app
    from protos.errors import RejectReason, UpdateRejected

    secret = "Patient 4711 was diagnosed with"

    def failing(msg, context):  # type: ignore[no-untyped-def]
        raise ValueError(f"row 3: cannot parse {secret!r}")

    def refusing(msg, context):  # type: ignore[no-untyped-def]
        raise UpdateRejected(RejectReason.BASE_MODEL_MISMATCH, "base model blake2b:aa, expected blake2b:bb")

    with pytest.raises(client_app.InstructionFailed) as failed:
        client_app._nothing_of_the_data_in_errors(failing)(None, None)
    assert secret not in str(failed.value) and "ValueError" in str(failed.value)
    with pytest.raises(UpdateRejected, match="base_model_mismatch: base model blake2b:aa"):
        client_app._nothing_of_the_data_in_errors(refusing)(None, None)
