"""Round checkpoints: bit-exact round trip, private modes, torn writes never read, crash-safe save, pruning,
PEFT-loadable."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from protos.adapter import LoraSpec, adapter_layout, init_adapter
from server.checkpoint import (
    ADAPTER_WEIGHTS,
    MANIFEST,
    STRATEGY_STATE,
    CheckpointCorrupt,
    CheckpointStore,
)

SPEC = LoraSpec(rank=4, alpha=8)
BASE = "tiny-llama"
REPO = Path(__file__).resolve().parents[1]


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )


@pytest.fixture(scope="module")
def adapter() -> dict[str, np.ndarray]:
    """PEFT-initialised adapter with B set non-zero, so a wrong tensor would show."""
    ad = init_adapter(adapter_layout(tiny_config(), SPEC), seed=1)
    rng = np.random.default_rng(7)
    for name, arr in ad.items():
        if ".lora_B." in name:
            ad[name] = rng.normal(0.0, 0.1, size=arr.shape).astype(np.float32)
    return ad


def shifted(ad: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    return {n: a + np.float32(k) for n, a in ad.items()}


def run_state_for(k: int) -> dict:
    return {"round": k, "loss": 1.0 / (k + 3), "history": [{"round": i, "acc": i / 7} for i in range(k)]}


def fill(store: CheckpointStore, adapter, rounds) -> None:
    for k in rounds:
        store.save(k, shifted(adapter, k), SPEC, BASE, run_state_for(k))


def assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(sorted(got)) == list(sorted(want))
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype, name
        assert got[name].shape == arr.shape, name
        assert np.array_equal(got[name], arr), name


# ---- round trip ----------------------------------------------------------------


def test_round_trip_is_bit_exact(tmp_path, adapter):
    rng = np.random.default_rng(123)
    rng.normal(size=5)  # advance, so the saved state is not the seed's
    strategy_state = {
        "m.q": np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32),
        "v.q": np.random.default_rng(2).random((4, 64)),  # float64
        "step": np.array(17, dtype=np.int64),  # 0-d
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # non-contiguous view
        "subnormal": np.array([1e-45, -0.0, np.inf, -np.inf], dtype=np.float32),
    }
    run_state = {
        "job_id": "job-ß-1",
        "rng": rng.bit_generator.state,  # 128-bit ints
        "floats": [0.1, 1 / 3, 2.0**-1074, -0.0, 1e308, 123456789.12345678],
        "big": 2**100,
        "history": [{"round": 1, "loss": 2.302585092994046, "ok": True, "note": None}],
    }
    store = CheckpointStore(tmp_path / "ckpt")
    saved = store.save(1, adapter, SPEC, BASE, run_state, strategy_state)
    assert saved.path == tmp_path / "ckpt" / "round-00001"

    for got in (store.load(1), CheckpointStore(tmp_path / "ckpt").latest()):
        assert got is not None and got.round == 1
        assert_same_arrays(got.adapter, adapter)
        assert_same_arrays(got.strategy_state, strategy_state)
        assert got.run_state == run_state
        assert math.copysign(1.0, got.run_state["floats"][3]) == -1.0  # -0.0 keeps its sign
        assert got.lora == SPEC
        assert got.base_model == BASE
        assert got.path == saved.path
    # The RNG resumes exactly where it was.
    resumed = np.random.default_rng()
    resumed.bit_generator.state = store.load(1).run_state["rng"]
    assert np.array_equal(resumed.normal(size=3), rng.normal(size=3))


def test_nan_in_run_state_round_trips(tmp_path, adapter):
    store = CheckpointStore(tmp_path)
    store.save(0, adapter, SPEC, BASE, {"loss": float("nan")})
    assert math.isnan(store.load(0).run_state["loss"])


def test_layout_and_manifest(tmp_path, adapter):
    store = CheckpointStore(tmp_path)
    ck = store.save(3, adapter, SPEC, BASE, {"round": 3})  # no strategy state
    d = tmp_path / "round-00003"
    names = {p.name for p in d.iterdir()}
    assert names == {"adapter_config.json", ADAPTER_WEIGHTS, "run_state.json", STRATEGY_STATE, MANIFEST}
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["format"] == 1 and manifest["round"] == 3
    for name, entry in manifest["files"].items():
        data = (d / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert set(manifest["files"]) == names - {MANIFEST}
    assert json.loads((d / "adapter_config.json").read_text()) == SPEC.peft_config_dict(BASE)
    assert store.load(3).strategy_state == {}
    assert ck.strategy_state == {}


def test_latest_and_rounds(tmp_path, adapter):
    store = CheckpointStore(tmp_path, keep_last=10)
    assert store.latest() is None and store.rounds() == []
    fill(store, adapter, [0, 1, 2])
    latest = store.latest()
    assert latest.round == 2
    assert_same_arrays(latest.adapter, shifted(adapter, 2))
    assert latest.run_state == run_state_for(2)
    assert store.rounds() == [0, 1, 2]
    with pytest.raises(FileNotFoundError):
        store.load(7)


@pytest.mark.parametrize(
    "bad",
    [("tuple", (1, 2)), ("intkey", {1: "a"}), ("npfloat", np.float32(1.5)), ("set", {1})],
    ids=lambda b: b[0],
)
def test_run_state_that_would_not_round_trip_is_refused_before_writing(tmp_path, adapter, bad):
    store = CheckpointStore(tmp_path)
    with pytest.raises(TypeError):
        store.save(1, adapter, SPEC, BASE, {"x": bad[1]})
    assert list(tmp_path.iterdir()) == []


# ---- who can read a checkpoint -------------------------------------------------


def test_checkpoints_are_private_and_older_loose_ones_are_closed(tmp_path, adapter):
    """0700 directories, 0600 files (issue 11: they hold every round's state); a root and
    round dirs left group/other-readable by an older silotune are tightened on start.
    (tests/test_dp_noise_secrecy.py: the same under umask 0, temp files included.)"""
    import stat

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    store = CheckpointStore(tmp_path / "ckpt")
    fill(store, adapter, [1])
    root = tmp_path / "ckpt"
    assert mode(root) == 0o700 and mode(root / "round-00001") == 0o700
    assert {mode(p) for p in (root / "round-00001").iterdir()} == {0o600}
    os.chmod(root, 0o755)
    os.chmod(root / "round-00001", 0o755)
    CheckpointStore(root)   # a restarted coordinator
    assert mode(root) == 0o700 and mode(root / "round-00001") == 0o700
    assert CheckpointStore(root).latest().round == 1


# ---- torn or damaged writes are never read -------------------------------------


def test_tmp_dir_is_ignored_and_cleaned(tmp_path, adapter):
    store = CheckpointStore(tmp_path)
    fill(store, adapter, [1, 2])
    # A writer that died mid-save: partial files, even a complete-looking manifest.
    tmp = tmp_path / f".tmp-round-00003-{os.getpid()}-0badc0de"
    tmp.mkdir()
    (tmp / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 10)
    (tmp / MANIFEST).write_text(json.dumps({"format": 1, "round": 3, "files": {}}))
    assert store.latest().round == 2
    assert store.rounds() == [1, 2]
    CheckpointStore(tmp_path)  # a restarted coordinator
    assert not tmp.exists()


def _truncate(d: Path) -> None:
    p = d / ADAPTER_WEIGHTS
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _no_manifest(d: Path) -> None:
    (d / MANIFEST).unlink()


def _flip_byte(d: Path) -> None:
    p = d / ADAPTER_WEIGHTS
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01  # same size: only the hash can tell
    p.write_bytes(bytes(data))


def _flip_strategy_byte(d: Path) -> None:
    p = d / STRATEGY_STATE
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x80
    p.write_bytes(bytes(data))


def _bad_manifest_json(d: Path) -> None:
    (d / MANIFEST).write_text('{"format": 1, "round": 2, "fil')


def _missing_run_state(d: Path) -> None:
    (d / "run_state.json").unlink()


def _wrong_round(d: Path) -> None:
    m = json.loads((d / MANIFEST).read_text())
    m["round"] = 1
    (d / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize(
    "damage",
    [_truncate, _no_manifest, _flip_byte, _flip_strategy_byte, _bad_manifest_json, _missing_run_state, _wrong_round],
)
def test_damaged_newest_is_skipped(tmp_path, adapter, damage, caplog):
    store = CheckpointStore(tmp_path)
    s0 = {"m": np.ones((2, 2), np.float32)}
    store.save(1, shifted(adapter, 1), SPEC, BASE, run_state_for(1), s0)
    store.save(2, shifted(adapter, 2), SPEC, BASE, run_state_for(2), s0)
    damage(tmp_path / "round-00002")
    with caplog.at_level(logging.WARNING, logger="silotune.checkpoint"):
        latest = CheckpointStore(tmp_path).latest()
    assert latest.round == 1
    assert_same_arrays(latest.adapter, shifted(adapter, 1))
    assert any(r.name == "silotune.checkpoint" and "round-00002" in r.getMessage() for r in caplog.records)
    assert store.rounds() == [1]
    with pytest.raises(CheckpointCorrupt) as info:
        store.load(2)
    assert info.value.path == tmp_path / "round-00002"
    assert "round-00002" in str(info.value)


def test_all_damaged_gives_none(tmp_path, adapter):
    store = CheckpointStore(tmp_path)
    fill(store, adapter, [1])
    _truncate(tmp_path / "round-00001")
    assert store.latest() is None


# ---- crash while saving --------------------------------------------------------


def test_crash_at_rename_keeps_previous_and_same_round_saves_later(tmp_path, adapter, monkeypatch):
    store = CheckpointStore(tmp_path)
    fill(store, adapter, [1, 2])

    def boom(*args, **kwargs):
        raise OSError("simulated crash at rename")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError, match="simulated"):
        store.save(3, shifted(adapter, 3), SPEC, BASE, run_state_for(3))
    monkeypatch.undo()

    fresh = CheckpointStore(tmp_path)
    assert fresh.latest().round == 2
    assert not (tmp_path / "round-00003").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    fresh.save(3, shifted(adapter, 3), SPEC, BASE, run_state_for(3))
    latest = fresh.latest()
    assert latest.round == 3
    assert_same_arrays(latest.adapter, shifted(adapter, 3))


def test_failure_at_every_fsync_never_exposes_a_partial_round(tmp_path, adapter, monkeypatch):
    """Fail the n-th fsync for every n: the store shows round 2, or all of round 3."""
    store = CheckpointStore(tmp_path, keep_last=10)
    fill(store, adapter, [1, 2])
    real_fsync = os.fsync
    new = shifted(adapter, 3)
    n = 0
    while True:
        calls = 0

        def failing_fsync(fd, _n=n):
            nonlocal calls
            calls += 1
            if calls > _n:
                raise OSError(f"simulated crash at fsync #{_n}")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", failing_fsync)
        try:
            store.save(3, new, SPEC, BASE, run_state_for(3))
            finished = True
        except OSError:
            finished = False
        monkeypatch.setattr(os, "fsync", real_fsync)
        latest = CheckpointStore(tmp_path, keep_last=10).latest()
        assert latest.round in (2, 3)
        if latest.round == 3:  # the rename happened: it must be complete
            assert_same_arrays(latest.adapter, new)
        if finished:
            break
        n += 1
    assert n >= 6  # one per file, the manifest, the tmp dir, the root
    assert CheckpointStore(tmp_path).latest().round == 3


def test_resave_same_round_identical_keeps_dir_different_replaces(tmp_path, adapter):
    store = CheckpointStore(tmp_path)
    store.save(3, adapter, SPEC, BASE, {"a": 1})
    inode = (tmp_path / "round-00003").stat().st_ino
    store.save(3, adapter, SPEC, BASE, {"a": 1})  # replay after a crash past the rename
    assert (tmp_path / "round-00003").stat().st_ino == inode
    store.save(3, shifted(adapter, 5), SPEC, BASE, {"a": 2})
    got = store.load(3)
    assert got.run_state == {"a": 2}
    assert_same_arrays(got.adapter, shifted(adapter, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00003"]


def test_death_between_the_renames_of_a_replace_restores_the_old_round(tmp_path, adapter):
    store = CheckpointStore(tmp_path)
    store.save(3, adapter, SPEC, BASE, {"a": 1})
    # State left by a kill after "round-00003 -> .old-round-..." and before "tmp -> round-00003".
    os.rename(tmp_path / "round-00003", tmp_path / f".old-round-00003-{os.getpid()}-1234abcd")
    (tmp_path / f".tmp-round-00003-{os.getpid()}-5678abcd").mkdir()
    restarted = CheckpointStore(tmp_path)
    assert restarted.latest().run_state == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00003"]


_WRITER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from protos.adapter import LoraSpec
    from server.checkpoint import CheckpointStore

    root, config = sys.argv[1], json.loads(sys.argv[2])

    class Spec(LoraSpec):  # skip importing peft (seconds) in this child
        def peft_config_dict(self, base):
            return config

    store = CheckpointStore(root, keep_last=2)
    last = store.latest()
    start = 0 if last is None else last.round + 1
    base = np.arange(256 * 1024, dtype=np.float32)
    for k in range(start, start + 100000):
        store.save(k, {"w.lora_A.weight": base + k}, Spec(rank=4, alpha=8), "tiny", {"round": k},
                   {"m": np.full(1000, k, np.float64)})
    """
)


def test_sigkill_at_random_moments_always_resumes_consistent(tmp_path):
    """A real coordinator kill (SIGKILL, no cleanup) at random points of the save loop."""
    root = tmp_path / "ckpt"
    config = json.dumps(SPEC.peft_config_dict("tiny"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = np.random.default_rng(0)
    last_round = -1
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), config], env=env, cwd=REPO)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # let it write a few rounds past where it started
                done = sorted(root.glob("round-*")) if root.exists() else []
                if done and int(done[-1].name.split("-")[1]) >= last_round + 3:
                    break
                assert proc.poll() is None, "writer exited early"
                time.sleep(0.01)
            time.sleep(float(rng.uniform(0, 0.05)))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        latest = CheckpointStore(root, keep_last=2).latest()
        assert latest is not None and latest.round >= last_round
        k = latest.round
        assert latest.run_state == {"round": k}
        assert np.array_equal(latest.adapter["w.lora_A.weight"], np.arange(256 * 1024, dtype=np.float32) + k)
        assert np.array_equal(latest.strategy_state["m"], np.full(1000, k, np.float64))
        last_round = k
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # init cleaned the dead writers' tmp dirs


# ---- pruning -------------------------------------------------------------------


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_pruning_keeps_keep_last(tmp_path, adapter, keep_last):
    store = CheckpointStore(tmp_path, keep_last=keep_last)
    fill(store, adapter, range(6))
    want = list(range(6 - keep_last, 6))
    assert store.rounds() == want
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"round-{k:05d}" for k in want]


def test_pruning_does_not_count_a_corrupt_checkpoint(tmp_path, adapter):
    store = CheckpointStore(tmp_path, keep_last=2)
    fill(store, adapter, [0, 1, 2])
    _flip_byte(tmp_path / "round-00002")
    store.save(3, adapter, SPEC, BASE, {})
    # Round 2 is unusable, so round 1 is still one of the two valid ones kept.
    assert store.rounds() == [1, 3]


# ---- the round dir is a PEFT adapter folder ------------------------------------


def test_round_dir_loads_with_peft(tmp_path, adapter, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # peft would look "tiny-llama" up on the Hub
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    ck = CheckpointStore(tmp_path).save(1, adapter, SPEC, BASE, {})
    peft_model = PeftModel.from_pretrained(model, ck.path)
    state = {k: v.detach().cpu().numpy() for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}
    assert_same_arrays(state, adapter)
