"""DP-FedAvg under secure aggregation.

Organizations clip their delta to C and mask it with weight 1; the coordinator
unmasks the sum of the clipped deltas and dp-fedavg adds N(0, (zC)²) once,
from its checkpointed generator, and divides by the expected count as in the
plain path. Compared with the plain DP path (the coordinator clips each
update): the same global within the quantization error, the same noise draw,
the same ε, and a resumed job that ends byte for byte where a straight one
does. Scripted organizations (tests/test_secure_round.py's SecureGrid): no
Ray, no model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from flwr.app import RecordDict

from clients import privacy
from clients.secure_aggregation import _clip_for_ring
from protos import codec
from protos.job_settings import JobSettings
from protos.records import CONFIG_RECORD
from protos.round_config import RoundConfig, round_config
from protos.secagg import RingSpec, SecAggError, wire
from server.checkpoint import CheckpointStore
from server.job import Job
from server.job_config import JobConfig, JobConfigError
from server.secure_aggregation import SecureRound, SecureSettings
from strategies.base import SecureInput
from strategies.dp_fedavg import DpFedAvg
from test_dp_job import _epsilon
from test_secure_round import LORA, SHAPES, SecureGrid, _expectation, _global, _job_config

CLIP = 0.05


@pytest.fixture(autouse=True)
def _no_full_collections(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cyclic collection after each pull costs ~1 s on a busy 2-core machine; memory is not measured here."""
    import server.exchange

    monkeypatch.setattr(server.exchange.gc, "collect", lambda *args: 0)


class DpGrid(SecureGrid):
    """SecureGrid whose organizations apply the round config's DP step as
    clients/round_work.py does (clip, and noise if asked), and record what they were asked."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[float, float]] = []   # (dp_clip, dp_noise) per training

    def _trainer(self, node: int) -> Callable[[RecordDict], RecordDict]:
        scripted = super()._trainer(node)

        def train(content: RecordDict) -> RecordDict:
            reply = scripted(content)
            cfg = RoundConfig.from_record(content.config_records[CONFIG_RECORD])
            self.asked.append((cfg.dp_clip, cfg.dp_noise))
            if cfg.dp_clip == 0:
                return reply
            header, update = codec.decode(reply)
            _, start = codec.decode(content)
            private = privacy.privatize(start, update, sorted(update), cfg.dp_clip, cfg.dp_noise,
                                        np.random.default_rng(node))
            out = codec.encode(private, kind=header.kind, job_id=header.job_id, server_round=header.round,
                               fingerprint=header.base_model_fingerprint,
                               lora=codec.lora_spec_from_proto(header.adapter), num_examples=header.num_examples)
            out["organization"] = reply["organization"]
            return out
        return train


# ---- one secure round against the plain path ----------------------------------
def _train_content(global_adapter):
    content = codec.encode(global_adapter, kind=codec.Kind.Value("GLOBAL"), job_id="j", server_round=1,
                           fingerprint="f", lora=LORA)
    settings = JobSettings(job_id="j", model="m", lora_r=LORA.rank, lora_alpha=LORA.alpha,
                           lora_targets=",".join(LORA.target_modules))
    content[CONFIG_RECORD] = round_config(settings, 1, dp_clip=CLIP).to_record()
    return content


def _strategy(z: float, sampled: int) -> DpFedAvg:
    strategy = DpFedAvg(clip_norm=CLIP, noise_multiplier=z, noise_seed=5)
    strategy.plan_round(sampled, 2 * sampled)
    strategy.begin_round(1, _global())
    return strategy


def _secure_round(grid: SecureGrid, z: float):
    strategy = _strategy(z, len(grid.deltas))
    secure = SecureRound(grid, SecureSettings(), timeout=0.3, poll_interval=0.005)
    outcome = secure.run(job_id="j", server_round=1, sampled=sorted(grid.deltas),
                         train_content=_train_content(_global()), reference=_global(), strategy=strategy,
                         expectation=_expectation())
    assert outcome.failure == ""
    return outcome, strategy.finish_round()


def _plain_round(grid: SecureGrid, nodes: list[int], z: float):
    strategy = _strategy(z, len(grid.deltas))
    for node in nodes:
        strategy.accumulate(grid.plain_update(node, _global()), grid.weights[node])
    return strategy, strategy.finish_round()


@pytest.mark.parametrize("z", [0.0, 1.0])
@pytest.mark.parametrize("silent", [set(), {3}])   # {3}: masked, never arrived; both paths divide by m = 6
def test_the_secure_dp_round_is_the_plain_dp_round(z, silent):
    nodes = [1, 2, 3, 4, 5, 6]
    # |Δ| ≈ 12·scale over 144 values: 0.012 … 0.096 against C = 0.05, so some are clipped
    grid = SecureGrid({n: 0.001 * (n + 2) for n in nodes}, {n: 10 ** n for n in nodes}, silent={wire.MASK: silent})
    outcome, secure = _secure_round(grid, z)
    survivors = [n for n in nodes if n not in silent]
    assert outcome.accepted == survivors and outcome.weight_sum == len(survivors)   # weight 1 each
    plain_strategy, plain = _plain_round(grid, survivors, z)
    assert 0 < plain_strategy.clipped < len(survivors)
    for name in SHAPES:   # the same clipped uniform mean and the same noise draw
        np.testing.assert_allclose(secure[name], plain[name], rtol=0, atol=outcome.error_bound + 1e-7)
    if z == 0:   # by hand: global + Σ clip(Δᵢ, C) / m, whatever the example counts
        base = _global()
        deltas = [{k: grid.plain_update(n, base)[k].astype(np.float64) - base[k] for k in base} for n in survivors]
        scales = [min(1.0, CLIP / np.sqrt(sum(float(np.vdot(d[k], d[k])) for k in d))) for d in deltas]
        for name in SHAPES:
            expected = base[name] + sum(s * d[name] for s, d in zip(scales, deltas)) / len(nodes)
            np.testing.assert_allclose(secure[name], expected, rtol=0, atol=outcome.error_bound + 1e-7)
            weighted = base[name] + sum(grid.weights[n] * s * d[name] for n, s, d in zip(survivors, scales, deltas)) \
                / sum(grid.weights[n] for n in survivors) * len(survivors) / len(nodes)
            assert np.abs(weighted - expected).max() > 100 * outcome.error_bound   # the test would see weights


def test_what_is_masked_has_norm_at_most_c_once_rounded():
    """Rounding to the ring's step can lengthen a vector by up to √P·step/2: an
    organization clips to C less that, so what enters the sum has norm <= C (the
    sensitivity), exactly, in the ring's integers. A coarse ring shows it."""
    ring = RingSpec.derive(3, CLIP, 1, frac_bits=12)         # step 2^-12, P = 128²: √P·step/2 ≈ 0.016
    size = 128 * 128
    x = np.ones(size)
    naive = x * (CLIP / np.linalg.norm(x))                   # clipped to C alone: 1.6 steps each, rounded to 2
    ours = _clip_for_ring(x.copy(), CLIP, ring)

    def rounded_norm(values: np.ndarray) -> float:
        q = ring.to_signed(ring.quantize(values, 1))
        return float(np.sqrt(np.sum(q.astype(object) ** 2))) * ring.step   # exact integer sum of squares

    assert rounded_norm(naive) > CLIP >= rounded_norm(ours) > CLIP - 2 * ring.rounding_norm(size)
    with pytest.raises(SecAggError, match="does not fit the session's ring"):
        _clip_for_ring(x.copy(), 0.01, ring)
    with pytest.raises(SecAggError, match="count each organization once"):
        _clip_for_ring(x.copy(), CLIP, RingSpec.derive(3, CLIP, 10))
    # the coordinator names a configuration that cannot fit before any message goes out
    with pytest.raises(SecAggError, match="dp clip_norm 1.0 does not fit a 32-bit ring for 2 organizations"):
        SecureRound(SecureGrid({}, {}), SecureSettings(), timeout=1, poll_interval=1)._ring(
            2, 2**62, SecureInput(clip_norm=1.0))


# ---- through the Job ----------------------------------------------------------
DP = f"clip_norm={CLIP},noise_multiplier=1.0,noise_seed=3"


def _dp_job(tmp_path: Path, grid: SecureGrid, **settings) -> Job:
    base = dict(strategy="dp-fedavg", strategy_params=DP, lora_r=4)
    base.update(settings)
    return Job(grid, _job_config(tmp_path, **base))


def _grid(zero: bool = False) -> DpGrid:
    nodes = [21, 22, 23, 24, 25]
    # tiny-llama at rank 4: 1792 values, |Δ| ≈ 42·scale: 0.008 … 0.042 … 0.21 against C = 0.05
    return DpGrid({n: 0.0 if zero else 0.0002 * 5 ** (i / 2) for i, n in enumerate(nodes)},
                  {n: 7 * (i + 1) for i, n in enumerate(nodes)})


def test_dp_fedavg_with_secure_aggregation_is_configured_not_refused():
    cfg = JobConfig.from_run_config({"strategy": "dp-fedavg", "secure-aggregation": True, "min-nodes": 2})
    assert cfg.secure_aggregation and cfg.build_strategy().secure_input().clip_norm == 1.0
    with pytest.raises(JobConfigError, match="secure-aggregation.*noise_placement='server'"):
        JobConfig.from_run_config({"strategy": "dp-fedavg", "strategy-params": "noise_placement=local",
                                   "secure-aggregation": True, "min-nodes": 2})
    with pytest.raises(JobConfigError, match="needs every individual update"):
        JobConfig.from_run_config({"strategy": "median", "secure-aggregation": True, "min-nodes": 2})


def test_a_secure_dp_job_reaches_the_plain_dp_job_and_spends_the_same_epsilon(tmp_path):
    """3 of 5 organizations sampled per round (q = 0.6), 2 rounds: same global, same ledger."""
    settings = dict(min_nodes=3, fraction_train=0.6)
    plain_grid, secure_grid = _grid(), _grid()
    plain_job = _dp_job(tmp_path / "plain", plain_grid, **settings)
    plain = plain_job.run()
    secure_job = _dp_job(tmp_path / "secure", secure_grid, secure_aggregation=True, **settings)
    secure = secure_job.run()
    # the organizations clip (the coordinator cannot) and add no noise of their own
    assert secure_grid.asked == [(CLIP, 0.0)] * 6 and plain_grid.asked == [(0.0, 0.0)] * 6
    for name, value in plain.adapter.items():
        np.testing.assert_allclose(secure.adapter[name], value, rtol=0, atol=1e-6)
    assert secure.run_state["privacy"] == plain.run_state["privacy"]
    assert plain.run_state["privacy"]["ledger"] == [{"q": 0.6, "noise_multiplier": 1.0, "steps": 2}]
    assert secure_job.privacy.epsilon == plain_job.privacy.epsilon == _epsilon(0.6, 1.0, 2)
    provenance = secure_job.privacy.provenance()   # what the exported specialist says
    assert provenance["secure_aggregation"] and provenance["clipped_by"] == "each organization"
    assert plain_job.privacy.provenance()["clipped_by"] == "the coordinator"
    history = secure.run_state["history"][-1]
    assert len(history["accepted"]) == 3 and history["rejected"] == []
    assert history["privacy"]["epsilon"] == _epsilon(0.6, 1.0, 2)


def test_the_noise_is_added_once(tmp_path):
    """Zero deltas: the new global minus the old is the noise alone, std z·C/m on each of
    28,672 values (rank 64) — not √N times that (noise per organization), not 0."""
    z, m = 1.0, 5
    job = _dp_job(tmp_path, _grid(zero=True), secure_aggregation=True, num_rounds=1, lora_r=64)
    final = job.run()
    start = CheckpointStore(job.cfg.checkpoint_dir).load(0).adapter
    noise = np.concatenate([(final.adapter[k].astype(np.float64) - start[k]).ravel() for k in start])
    assert noise.size == 28_672
    expected = z * CLIP / m
    assert abs(noise.std() / expected - 1) < 0.03          # the standard error is 0.4%
    assert abs(noise.mean()) < 4 * expected / np.sqrt(noise.size)


def test_a_resumed_secure_dp_job_draws_the_same_noise(tmp_path):
    straight = _dp_job(tmp_path / "straight", _grid(), secure_aggregation=True, num_rounds=3).run()
    _dp_job(tmp_path / "resumed", _grid(), secure_aggregation=True, num_rounds=1).run()
    resumed = _dp_job(tmp_path / "resumed", _grid(), secure_aggregation=True, num_rounds=3).run()
    for name, value in straight.adapter.items():
        assert value.tobytes() == resumed.adapter[name].tobytes()
    assert straight.strategy_state == resumed.strategy_state == {}   # noise = f(key, round): no generator state
    assert straight.run_state["privacy"] == resumed.run_state["privacy"]
