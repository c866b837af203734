"""Issue 11: the coordinator's DP noise cannot be taken back out of the checkpoints.

Before: dp-fedavg's noise generator state went into every checkpoint (0644), so
from two consecutive checkpoints anyone who could read them rebuilt round k+1's
noise from checkpoint k, subtracted it from the global of checkpoint k+1 and got
the un-noised mean of the organizations' updates back to 3e-8.

Now round k's noise is a function of (secret key, k) (strategies/dp_fedavg.py);
the 256-bit key lives in ``<run-dir>/secrets/dp-noise.key`` (0600 in a 0700
directory), never under ``checkpoints/`` nor in the specialist or the report;
checkpoints record only its fingerprint (server/privacy.py) and are 0600/0700
(server/checkpoint.py). Here: the attack, played with only the checkpoint files
(it fails) and with the key (it works: the key is what matters); the modes; a
SIGKILLed DP job that resumes byte for byte; a missing or swapped key refused by
name.

Scripted organizations (tests/test_round_loop.py, tests/faults/faultkit.py): no
Ray, no training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from server.app import run_job
from server.checkpoint import ADAPTER_WEIGHTS, RUN_STATE, STRATEGY_STATE, CheckpointStore, write_synced
from server.job import Job
from server.privacy import (
    NoiseKeyError,
    NoiseKeyMismatch,
    NoiseKeyMissing,
    noise_key_path,
    read_noise_key,
    write_noise_key,
)
from strategies.dp_fedavg import noise_key_fingerprint, noise_key_from_seed, round_noise_generator
from test_round_loop import ScriptedGrid, config, honest

sys.path.insert(0, str(Path(__file__).resolve().parent / "faults"))
from faultkit import orgs, run_forked  # noqa: E402

CLIP, Z, ORGS = 1.0, 1.0, 3
DP = f"clip_norm={CLIP},noise_multiplier={Z}"          # no noise_seed: the key is a secret
DELTAS = {node: 0.001 * node for node in range(1, ORGS + 1)}   # |Δ| ≤ 0.13 < C: nothing is clipped
NOISE_STD = Z * CLIP / ORGS                          # per coordinate of the global's step


@pytest.fixture(autouse=True)
def _no_full_collections(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exchange collects cycles after each pull (~1 s on a busy 2-core machine); not measured here."""
    import server.exchange

    monkeypatch.setattr(server.exchange.gc, "collect", lambda *args: 0)


def _grid() -> ScriptedGrid:
    return ScriptedGrid({node: honest(delta) for node, delta in DELTAS.items()})


def _settings(**extra: object) -> dict[str, object]:
    return {"min_nodes": ORGS, "strategy": "dp-fedavg", "strategy_params": DP, **extra}


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 3-round dp-fedavg job with the coordinator's noise, exported and reported."""
    run_dir = tmp_path_factory.mktemp("dp-run")
    run_job(_grid(), config(run_dir, num_rounds=3, **_settings()))
    return run_dir


# ---- the attack ---------------------------------------------------------------------------
def _step_mean(before: dict[str, np.ndarray], after: dict[str, np.ndarray], noise: dict[str, np.ndarray] | None,
               ) -> dict[str, np.ndarray]:
    """What the attacker computes: global(k+1) − global(k) − its guess of round k+1's noise."""
    return {k: after[k].astype(np.float64) - before[k].astype(np.float64) - (0.0 if noise is None else noise[k])
            for k in before}


def _noise_as_drawn(rng: np.random.Generator, like: dict[str, np.ndarray], std: float) -> dict[str, np.ndarray]:
    """The noise of one round as dp-fedavg draws it: one stream over the tensors in sorted order."""
    return {k: rng.standard_normal(like[k].shape) * std for k in sorted(like)}


def _rms_error(recovered: dict[str, np.ndarray], true_step: float) -> float:
    return float(np.sqrt(np.mean(np.concatenate([(v - true_step).ravel() for v in recovered.values()]) ** 2)))


def _candidate_generators(checkpoints: Path, k: int, job_seed: int) -> Iterator[tuple[str, np.random.Generator]]:
    """Every generator an attacker holding only ``checkpoints/`` could try for round k+1's noise."""
    ck = CheckpointStore(checkpoints).load(k)
    state = ck.strategy_state
    if "noise_rng_state" in state:   # the attack that worked before issue 11
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = json.loads(np.asarray(state["noise_rng_state"], np.uint8).tobytes().decode())
        yield "the checkpointed PCG64 state", rng
    record = ck.run_state.get("privacy", {}).get("noise_key") or {}
    material: dict[str, bytes] = {}
    if "fingerprint" in record:      # what the checkpoint says about the key
        fp = record["fingerprint"]
        material["the fingerprint, hashed"] = hashlib.sha256(fp.encode()).digest()
        material["the fingerprint's hex, padded"] = bytes.fromhex(fp.split(":")[1]).ljust(32, b"\0")
    for name in sorted(p.name for p in ck.path.iterdir()):   # every file of the checkpoint, as key material
        material[f"sha256({name})"] = hashlib.sha256((ck.path / name).read_bytes()).digest()
    for seed in [job_seed, *range(16)]:                        # a guessed noise_seed (the job seed is public)
        material[f"noise_seed={seed}"] = noise_key_from_seed(seed)
    for what, key in material.items():
        yield what, round_noise_generator(key, k + 1)
    rng = np.random.default_rng()
    rng.bit_generator.state = ck.run_state["rng"]              # the job's sampling generator
    yield "the job's sampling RNG state", rng


def test_two_consecutive_checkpoints_do_not_give_back_the_noise(dp_run: Path) -> None:
    checkpoints = dp_run / "checkpoints"
    store = CheckpointStore(checkpoints)
    assert store.rounds() == [1, 2, 3]       # keep_last=3
    k = 2
    before, after = store.load(k).adapter, store.load(k + 1).adapter
    history = store.load(k + 1).run_state["history"][-1]
    assert history["round"] == k + 1 and len(history["accepted"]) == ORGS == history["sampled"]
    true_step = sum(DELTAS.values()) / ORGS  # the un-noised mean the test knows: every org sent global + δ
    # nothing of the noise is in the checkpoint: no generator state, a fingerprint only
    assert store.load(k).strategy_state == {}
    assert (checkpoints / f"round-{k:05d}" / STRATEGY_STATE).stat().st_size < 64   # an empty safetensors file
    # the un-noised step is hidden by noise of the stated size
    assert _rms_error(_step_mean(before, after, None), true_step) == pytest.approx(NOISE_STD, rel=0.1)
    # the attacker, with only checkpoints/: every reconstruction leaves an error of the order of the noise
    tried = 0
    for what, rng in _candidate_generators(checkpoints, k, job_seed=0):
        error = _rms_error(_step_mean(before, after, _noise_as_drawn(rng, before, NOISE_STD)), true_step)
        assert error > 0.5 * NOISE_STD, f"{what} gave the un-noised mean back to {error:.2g}"
        tried += 1
    assert tried >= 20
    # with the secret key the same computation gives the mean back to float32 rounding:
    # the key is all that protects it, and the attack above was the right one
    key = read_noise_key(noise_key_path(dp_run))
    noise = _noise_as_drawn(round_noise_generator(key, k + 1), before, NOISE_STD)
    error = _rms_error(_step_mean(before, after, noise), true_step)
    assert error < 1e-6, error


def test_the_key_never_leaves_the_secrets_directory(dp_run: Path) -> None:
    key = read_noise_key(noise_key_path(dp_run))
    fingerprint = noise_key_fingerprint(key)
    state = CheckpointStore(dp_run / "checkpoints").latest().run_state   # type: ignore[union-attr]
    assert state["privacy"]["noise_key"] == {"source": "secret", "fingerprint": fingerprint}
    secrets_dir = noise_key_path(dp_run).parent
    assert secrets_dir == dp_run / "secrets" and not secrets_dir.is_relative_to(dp_run / "checkpoints")
    elsewhere = [p for p in dp_run.rglob("*") if p.is_file() and secrets_dir not in p.parents]
    assert {"report.json", "provenance.json", RUN_STATE} <= {p.name for p in elsewhere}
    for path in elsewhere:   # checkpoints, the specialist, the report
        data = path.read_bytes()
        assert key not in data and key.hex().encode() not in data and key.hex().upper().encode() not in data, path
    provenance = json.loads((dp_run / "specialist" / "provenance.json").read_text())
    assert "NOT private" not in provenance["differential_privacy"]["noise_source"]
    assert "random 256-bit key" in provenance["differential_privacy"]["noise_source"]


# ---- who can read what ----------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_checkpoints_and_the_key_are_readable_by_the_coordinator_only(dp_run: Path) -> None:
    root = dp_run / "checkpoints"
    assert _mode(root) == 0o700
    entries = list(root.rglob("*"))
    assert len([p for p in entries if p.is_file()]) == 3 * 5
    for path in entries:
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), f"{path}: {oct(_mode(path))}"
    key = noise_key_path(dp_run)
    assert _mode(key.parent) == 0o700 and _mode(key) == 0o600
    assert sorted(p.name for p in key.parent.iterdir()) == [key.name]     # no temp file left
    for path in [root, *entries, key.parent, key]:
        assert not _mode(path) & 0o077, path
    # what is meant to be shared keeps the ordinary mode
    umask = os.umask(0)
    os.umask(umask)
    for shared in [dp_run / "report.json", *(dp_run / "specialist").iterdir()]:
        assert _mode(shared) == 0o666 & ~umask, shared


def test_private_from_creation_whatever_the_umask(tmp_path: Path) -> None:
    """Created with the mode (the umask can only take bits away), temp files included,
    and an old root that others could read is tightened before anything is written."""
    from protos.adapter import LoraSpec

    seen: list[tuple[str, int]] = []
    real_rename = os.rename

    def spy(src, dst):  # type: ignore[no-untyped-def]
        src = Path(src)
        if src.name.startswith(".tmp-round-"):    # the complete temp dir, just before it becomes round-k
            seen.append((src.name, _mode(src)))
            seen.extend((p.name, _mode(p)) for p in src.iterdir())
        return real_rename(src, dst)

    old = os.umask(0)   # the most permissive umask: nothing would be taken away
    try:
        loose = tmp_path / "ckpt"
        loose.mkdir(mode=0o755)
        os.chmod(loose, 0o755)
        os.rename = spy  # type: ignore[assignment]
        try:
            store = CheckpointStore(loose)
            store.save(1, {"w.lora_A.weight": np.ones((2, 2), np.float32)}, LoraSpec(rank=2, alpha=4), "tiny",
                       {"round": 1}, {"m": np.zeros(3)})
        finally:
            os.rename = real_rename  # type: ignore[assignment]
        assert _mode(loose) == 0o700
        assert len(seen) == 6 and all(mode == (0o700 if name.startswith(".tmp") else 0o600) for name, mode in seen)
        assert all(_mode(p) in (0o600, 0o700) for p in loose.rglob("*"))
        # the export path's default is the ordinary mode (here umask 0: 0666)
        write_synced(tmp_path, "shared.json", b"{}")
        assert _mode(tmp_path / "shared.json") == 0o666
        write_noise_key(tmp_path / "s" / "k.key", b"\x01" * 32)
        assert _mode(tmp_path / "s") == 0o700 and _mode(tmp_path / "s" / "k.key") == 0o600
    finally:
        os.umask(old)


# ---- resume: byte for byte with the key, refused without it -------------------------------
@pytest.mark.parametrize("fault", ["after-aggregate@2", "checkpoint-write@2#3", "mid-evaluate@3"])
def test_a_killed_dp_job_resumes_byte_identical(fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL inside a round (noise drawn, not on disk; a torn checkpoint; during evaluation),
    restart: the resumed coordinator reads the key back and ends on the very bytes of an
    uninterrupted run with the same key."""
    dp = dict(strategy="dp-fedavg", strategy_params="clip_norm=0.5,noise_multiplier=0.8", num_rounds=3)
    killed = tmp_path / "killed"
    assert run_forked(killed, orgs(3), fault=fault, **dp) == -9
    key_file = noise_key_path(killed)
    key, inode = read_noise_key(key_file), key_file.stat().st_ino
    assert run_forked(killed, orgs(3), **dp) == 0, (killed / "coordinator.log").read_text()[-3000:]
    assert key_file.stat().st_ino == inode and read_noise_key(key_file) == key   # read back, not made again
    # the uninterrupted run, given the same key when it makes its own
    import server.privacy

    monkeypatch.setattr(server.privacy, "new_noise_key", lambda: key)
    straight = tmp_path / "straight"
    assert run_forked(straight, orgs(3), **dp) == 0, (straight / "coordinator.log").read_text()[-3000:]
    want, got = (CheckpointStore(d / "checkpoints").latest() for d in (straight, killed))
    assert want is not None and got is not None and want.round == got.round == 3
    for name in (ADAPTER_WEIGHTS, STRATEGY_STATE):
        assert (got.path / name).read_bytes() == (want.path / name).read_bytes(), name
    assert got.run_state["privacy"] == want.run_state["privacy"]
    assert got.run_state["privacy"]["noise_key"]["fingerprint"] == noise_key_fingerprint(key)
    # and the noise was there: another key gives other bytes
    monkeypatch.setattr(server.privacy, "new_noise_key", lambda: bytes(32))
    other = tmp_path / "other-key"
    assert run_forked(other, orgs(3), **dp) == 0
    assert (CheckpointStore(other / "checkpoints").latest().path / ADAPTER_WEIGHTS).read_bytes() != \
        (want.path / ADAPTER_WEIGHTS).read_bytes()  # type: ignore[union-attr]


def _one_round(run_dir: Path) -> None:
    Job(_grid(), config(run_dir, num_rounds=1, **_settings())).run()


def test_a_missing_key_is_refused_by_name(tmp_path: Path) -> None:
    _one_round(tmp_path)
    key_file = noise_key_path(tmp_path)
    kept = key_file.read_bytes()
    key_file.unlink()
    with pytest.raises(NoiseKeyMissing, match=r"dp-noise\.key is missing.*new run-dir"):
        Job(_grid(), config(tmp_path, num_rounds=2, **_settings())).run()
    assert not key_file.exists(), "a refused resume must not leave a new key behind"
    assert CheckpointStore(tmp_path / "checkpoints").rounds() == [0, 1]
    # the key restored: the job goes on
    write_noise_key(key_file, read_noise_key_bytes(kept))
    assert Job(_grid(), config(tmp_path, num_rounds=2, **_settings())).run().round == 2


def read_noise_key_bytes(content: bytes) -> bytes:
    return bytes.fromhex(content.decode().split("\n")[1])


def test_a_swapped_or_damaged_key_is_refused_by_name(tmp_path: Path) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    _one_round(mine)
    _one_round(other)
    key_file = noise_key_path(mine)
    original = key_file.read_bytes()
    shutil.copyfile(noise_key_path(other), key_file)    # another job's key
    with pytest.raises(NoiseKeyMismatch, match="another job's key"):
        Job(_grid(), config(mine, num_rounds=2, **_settings())).run()
    key_file.write_text("not a key\n")
    with pytest.raises(NoiseKeyError, match="damaged"):
        Job(_grid(), config(mine, num_rounds=2, **_settings())).run()
    key_file.write_bytes(original)
    # switching to an explicit noise_seed would add other noise too
    with pytest.raises(NoiseKeyMismatch, match="noise_seed changed"):
        Job(_grid(), config(mine, num_rounds=2, **_settings(strategy_params=DP + ",noise_seed=5"))).run()
    assert CheckpointStore(mine / "checkpoints").rounds() == [0, 1]
    assert Job(_grid(), config(mine, num_rounds=2, **_settings())).run().round == 2


def test_a_fresh_job_makes_its_own_key_and_noise_seed_writes_none(tmp_path: Path) -> None:
    """A new job never reuses a key left in its run-dir (two jobs with one key: the difference
    of their globals would cancel the noise); with noise_seed (NOT private) no key file is made."""
    _one_round(tmp_path / "a")
    left = read_noise_key(noise_key_path(tmp_path / "a"))
    shutil.rmtree(tmp_path / "a" / "checkpoints")
    _one_round(tmp_path / "a")
    assert read_noise_key(noise_key_path(tmp_path / "a")) != left
    seeded = tmp_path / "seeded"
    final = Job(_grid(), config(seeded, num_rounds=1, **_settings(strategy_params=DP + ",noise_seed=5"))).run()
    assert not (seeded / "secrets").exists()
    assert final.run_state["privacy"]["noise_key"]["source"] == "noise_seed"
    local = tmp_path / "local"
    Job(_grid(), config(local, num_rounds=1, min_nodes=ORGS, strategy="dp-fedavg",
                        strategy_params="noise_placement=local")).run()
    assert not (local / "secrets").exists()
