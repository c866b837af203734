"""A coordinator SIGKILLed anywhere in a round resumes to the very same result.

Each coordinator here is a forked process running the real round loop
(server/job.py), the real checkpoint store and a real strategy (FedAdam, so
the server-optimizer moments must survive the kill) against a fake fleet of
three organizations (faultkit.FakeFleet). It is killed with SIGKILL — by a
named fault point inside it (server/fault_points.py) or from here at a random
moment — and another coordinator is started on the same run dir, until the
6-round job completes. The final checkpoint must equal, byte for byte, the
one of an uninterrupted run: adapter, strategy state (FedAdam m, v, step),
RNG state and the record of who took part in which round. A DP-FedAvg job
(central noise, seeded) checks the same for the privacy accountant's ledger
and the noise generator.

The same with real Flower processes is tests/faults/test_deployment_faults.py
(`make faults`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from faultkit import orgs, run_forked

from server.checkpoint import ADAPTER_WEIGHTS, MANIFEST, RUN_STATE, STRATEGY_STATE, CheckpointStore
from server.fault_points import POINTS

ROUNDS = 6


RUN_SECONDS: list[float] = []  # how long the uninterrupted run took


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    started = time.monotonic()
    assert run_forked(run_dir, orgs(3)) == 0, (run_dir / "coordinator.log").read_text()[-3000:]
    RUN_SECONDS.append(time.monotonic() - started)
    return run_dir


def final_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"round-{ROUNDS:05d}"


def assert_same_final(reference: Path, run_dir: Path) -> None:
    expected, got = final_dir(reference), final_dir(run_dir)
    for name in (ADAPTER_WEIGHTS, STRATEGY_STATE):
        assert (got / name).read_bytes() == (expected / name).read_bytes(), f"{name} differs after the kills"
    want, have = (json.loads((d / RUN_STATE).read_text()) for d in (expected, got))
    assert have["rng"] == want["rng"], "RNG state differs"
    assert have.get("privacy") == want.get("privacy"), "privacy accountant differs"
    strip = [{k: h[k] for k in ("round", "sampled", "accepted", "rejected", "timed_out", "eval")
              if k in h} for h in want["history"]]
    assert [{k: h[k] for k in s} for h, s in zip(have["history"], strip)] == strip
    assert json.loads((got / MANIFEST).read_text())["files"][ADAPTER_WEIGHTS] == \
        json.loads((expected / MANIFEST).read_text())["files"][ADAPTER_WEIGHTS]


def marks(run_dir: Path) -> list[tuple[str, str]]:
    path = run_dir / "faults.mark"
    return [tuple(line.split()[:2]) for line in path.read_text().splitlines()] if path.exists() else []


def finish(run_dir: Path) -> None:
    code = run_forked(run_dir, orgs(3))
    assert code == 0, (run_dir / "coordinator.log").read_text()[-3000:]


def test_reference_run_trained_every_round(reference: Path) -> None:
    history = json.loads((final_dir(reference) / RUN_STATE).read_text())["history"]
    assert [h["round"] for h in history] == list(range(ROUNDS + 1))
    assert all(len(h["accepted"]) == 3 for h in history[1:])
    step = CheckpointStore(reference / "checkpoints").latest().strategy_state["step"]  # type: ignore[union-attr]
    assert int(step) == ROUNDS, "FedAdam took one server step per round"


@pytest.mark.parametrize("point", [p for p in POINTS if p != "checkpoint-write"])
def test_sigkill_at_a_named_point_resumes_identical(point: str, reference: Path, tmp_path: Path) -> None:
    spec = f"{point}@3" + ("#2" if point == "mid-pull" else "")
    assert run_forked(tmp_path, orgs(3), fault=spec) == -9, "the fault point did not kill the coordinator"
    assert marks(tmp_path) == [(point, "3")]
    on_disk = CheckpointStore(tmp_path / "checkpoints").rounds()[-1]
    assert on_disk == (3 if point == "after-checkpoint" else 2)
    finish(tmp_path)
    assert_same_final(reference, tmp_path)


@pytest.mark.parametrize("nth", [1, 3, 5])
def test_torn_checkpoint_write_is_never_read_back(nth: int, reference: Path, tmp_path: Path) -> None:
    """Killed after the nth of the 5 files of round 4's checkpoint (5: the manifest, before the rename)."""
    assert run_forked(tmp_path, orgs(3), fault=f"checkpoint-write@4#{nth}") == -9
    root = tmp_path / "checkpoints"
    torn = [p for p in root.iterdir() if p.name.startswith(".tmp-round-00004")]
    assert len(torn) == 1 and len(list(torn[0].iterdir())) == nth, "no torn write was left to test with"
    assert not (root / "round-00004").exists()
    store = CheckpointStore(root)  # what a restarted coordinator does first
    latest = store.latest()
    assert latest is not None and latest.round == 3
    assert not torn[0].exists(), "the torn write was not cleaned up"
    finish(tmp_path)
    assert_same_final(reference, tmp_path)


def test_several_kills_at_random_points_of_one_run(reference: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("SILOTUNE_FAULT_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    schedule = sorted(((rng.randint(1, ROUNDS), rng.choice(POINTS)) for _ in range(4)))
    for server_round, point in schedule:
        spec = f"{point}@{server_round}"
        code = run_forked(tmp_path, orgs(3), fault=spec)
        # a point in a round that already completed before a previous kill is never reached again
        assert code in (-9, 0), f"seed {seed}: {spec}: exit {code}"
    finish(tmp_path)
    assert_same_final(reference, tmp_path)
    assert len(marks(tmp_path)) >= 1, f"seed {seed}: schedule {schedule} killed nothing"


def test_sigkill_from_outside_at_random_moments(reference: Path, tmp_path: Path) -> None:
    """The test itself sends SIGKILL after a random delay: any instruction may be the last."""
    seed = int(os.environ.get("SILOTUNE_FAULT_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    kills = 0
    longest = RUN_SECONDS[0]
    for _ in range(12):
        run_dir = tmp_path / "run"
        code = run_forked(run_dir, orgs(3), kill_after=rng.uniform(0.0, longest))
        if code == 0 and kills == 0:
            # it beat its kill: the reference ran on a busier machine. Start over, killing sooner
            shutil.rmtree(run_dir)
            longest /= 2
            continue
        if code == 0:
            break
        assert code == -9, f"seed {seed}: exit {code}"
        kills += 1
    else:
        finish(run_dir)
    assert kills >= 1, f"seed {seed}: every run finished before its kill"
    assert_same_final(reference, run_dir)


DP = dict(strategy="dp-fedavg", strategy_params="clip_norm=0.5,noise_multiplier=0.8,noise_seed=3")


@pytest.fixture(scope="module")
def dp_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("dp-uninterrupted")
    assert run_forked(run_dir, orgs(3), **DP) == 0, (run_dir / "coordinator.log").read_text()[-3000:]
    return run_dir


@pytest.mark.parametrize("spec", ["after-push@2", "after-aggregate@4", "checkpoint-write@5#3"])
def test_privacy_accountant_and_noise_survive_a_kill(spec: str, dp_reference: Path, tmp_path: Path) -> None:
    ledger = json.loads((final_dir(dp_reference) / RUN_STATE).read_text())["privacy"]
    assert ledger, "the DP job kept no accountant state"
    assert run_forked(tmp_path, orgs(3), fault=spec, **DP) == -9
    assert run_forked(tmp_path, orgs(3), **DP) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    assert_same_final(dp_reference, tmp_path)
