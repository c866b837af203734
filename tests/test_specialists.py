"""The specialist registry: versions, immutability, no half-written specialist; continued training.

Run dirs are built as a job leaves them: server/export.py's specialist folder from a checkpoint
of the tiny model, and a report.json from server/report.py's build_report. The continued-training
job runs on test_round_loop.py's scripted grid (no Ray, no Flower processes).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from protos.adapter import LoraSpec, adapter_layout, init_adapter
from runtime import base_model
from server import app, export, report, specialists
from server.checkpoint import ADAPTER_WEIGHTS, Checkpoint
from server.export import export_specialist
from server.job import Job
from server.job_config import JobConfig, JobConfigError
from server.report import build_report
from server.specialists import (
    RegistryError,
    SpecialistRegistry,
    adapter_from_peft_state,
    init_adapter_provenance,
    load_init_adapter,
)
from test_round_loop import ScriptedGrid, config, honest

MODEL = "tiny-llama"


def trained_adapter(lora: LoraSpec, seed: int) -> dict[str, np.ndarray]:
    """A tiny-llama adapter whose B factors are non-zero (it is not the fresh one)."""
    adapter = init_adapter(adapter_layout(base_model.model_config(MODEL), lora), seed)
    rng = np.random.default_rng(seed + 100)
    for name, value in adapter.items():
        if ".lora_B." in name:
            adapter[name] = rng.normal(0.0, 0.1, value.shape).astype(np.float32)
    return adapter


def finished_run(run_dir: Path, *, seed: int = 1, lora: LoraSpec | None = None, accuracy: float = 0.7,
                 **provenance: object) -> Path:
    """``run_dir`` as a finished job leaves it: specialist/ and report.json."""
    lora = lora or config(run_dir).lora
    history = [{"round": 0, "eval": {"org-a": {"accuracy": 0.2, "num_examples": 4.0}},
                "eval_overall": {"accuracy": 0.2}},
               {"round": 2, "eval": {"org-a": {"accuracy": accuracy, "num_examples": 4.0}},
                "eval_overall": {"accuracy": accuracy}}]
    checkpoint = Checkpoint(round=2, adapter=trained_adapter(lora, seed), lora=lora, base_model=MODEL,
                            run_state={"history": history}, strategy_state={}, path=run_dir / "checkpoints")
    prov = {"job_id": f"job-{seed}", "strategy": "fedavg", "secure_aggregation": False,
            "base_model_fingerprint": base_model.fingerprint(MODEL),
            "task_spec": {"kind": "classification", "fingerprint": "f" * 64}, **provenance}
    export_specialist(checkpoint, run_dir / app.SPECIALIST_DIR, prov, history=history)
    meta = {"job_id": prov["job_id"], "model": MODEL, "metric": "accuracy", "task_spec_fingerprint": "f" * 64}
    (run_dir / report.REPORT_FILE).write_text(json.dumps(build_report(history, meta)))
    return run_dir


@pytest.fixture
def registry(tmp_path: Path) -> SpecialistRegistry:
    return SpecialistRegistry(tmp_path / "state")


def folders(registry: SpecialistRegistry) -> list[str]:
    return sorted(p.relative_to(registry.folders).as_posix() for p in registry.folders.glob("*/*"))


def rows(registry: SpecialistRegistry) -> int:
    with sqlite3.connect(registry.database) as conn:
        return conn.execute("SELECT COUNT(*) FROM specialists").fetchone()[0]


def test_the_registry_uses_the_names_the_job_writes() -> None:
    assert specialists.PROVENANCE == export.PROVENANCE
    assert specialists.SPECIALIST_DIR == app.SPECIALIST_DIR
    assert specialists.REPORT_FILE == report.REPORT_FILE


def test_two_runs_under_one_name_are_versions_one_and_two_with_their_metrics(tmp_path, registry) -> None:
    first = registry.register("bbc-topics", finished_run(tmp_path / "run1", seed=1, accuracy=0.6), job_id="j1")
    second = registry.register("bbc-topics", finished_run(tmp_path / "run2", seed=2, accuracy=0.8), job_id="j2")

    assert (first.ref, second.ref) == ("bbc-topics:1", "bbc-topics:2")
    assert first.metrics["organizations"]["org-a"]["specialist"]["accuracy"] == 0.6
    assert second.metrics["overall"]["specialist"]["accuracy"] == 0.8
    assert second.metrics["overall"]["base"]["accuracy"] == 0.2
    assert second.job_id == "j2" and second.metric == "accuracy" and second.rounds == 2
    assert second.base_model == MODEL and second.task_spec["kind"] == "classification"
    assert second.task_spec_fingerprint == "f" * 64
    assert second.epsilon is None and second.secure_aggregation is False and second.parent is None
    assert second.path == registry.folders / "bbc-topics" / "v2"
    assert second.adapter_sha256 == second.provenance["adapter_sha256"] != first.adapter_sha256
    assert (second.path / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "run2/specialist" / ADAPTER_WEIGHTS).read_bytes()
    json.dumps(second.as_dict())  # what the service's API sends


def test_registered_files_are_read_only(tmp_path, registry) -> None:
    spec = registry.register("ro", finished_run(tmp_path / "run"), job_id="j")
    assert stat.S_IMODE(spec.path.stat().st_mode) == 0o555
    files = sorted(p.name for p in spec.path.iterdir())
    assert files == ["README.md", "adapter_config.json", ADAPTER_WEIGHTS, "provenance.json"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in spec.path.iterdir()} == {0o444}


def test_get_resolve_and_list(tmp_path, registry) -> None:
    run = finished_run(tmp_path / "run")
    registry.register("alpha", run, job_id="a1")
    registry.register("beta", run, job_id="b1")
    registry.register("alpha", run, job_id="a2")  # the same run twice: the caller asked for a new version

    assert [s.ref for s in registry.list()] == ["alpha:1", "beta:1", "alpha:2"]  # newest last
    assert [s.ref for s in registry.list("alpha")] == ["alpha:1", "alpha:2"]
    assert registry.get("alpha").version == 2 and registry.get("alpha", 1).job_id == "a1"
    assert registry.resolve("alpha").ref == "alpha:2" and registry.resolve("alpha:1").job_id == "a1"
    assert registry.resolve("beta:1") == registry.get("beta")
    assert SpecialistRegistry(registry.state_dir).get("alpha", 2) == registry.get("alpha", 2)  # reopened

    with pytest.raises(RegistryError, match=r"no specialist named 'gamma'; registered: alpha, beta"):
        registry.get("gamma")
    with pytest.raises(RegistryError, match=r"'alpha' has no version 3; it has v1, v2"):
        registry.resolve("alpha:3")
    with pytest.raises(RegistryError, match="NAME:VERSION"):
        registry.resolve("alpha:latest")


@pytest.mark.parametrize("name", ["", "Upper", "-dash-first", ".hidden", "a/b", "../x", "x" * 65, "with space"])
def test_a_bad_name_is_refused(tmp_path, registry, name) -> None:
    run = finished_run(tmp_path / "run")
    with pytest.raises(RegistryError, match="expected 1 to 64 characters"):
        registry.register(name, run, job_id="j")
    assert rows(registry) == 0 and folders(registry) == []


def test_a_run_without_its_report_is_refused(tmp_path, registry) -> None:
    run = finished_run(tmp_path / "run")
    (run / report.REPORT_FILE).unlink()
    with pytest.raises(RegistryError, match="report.json is missing"):
        registry.register("x", run, job_id="j")


def test_an_adapter_that_is_not_the_exported_one_is_refused_and_nothing_is_registered(tmp_path, registry) -> None:
    run = finished_run(tmp_path / "run")
    weights = run / "specialist" / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01   # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="sha256"):
        registry.register("tampered", run, job_id="j")
    assert rows(registry) == 0 and folders(registry) == []


def test_a_failed_rename_leaves_no_row_and_no_folder(tmp_path, registry, monkeypatch) -> None:
    run = finished_run(tmp_path / "run")

    def rename(src, dst):  # type: ignore[no-untyped-def]
        raise OSError("disk gone")

    monkeypatch.setattr(specialists.os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        registry.register("crash", run, job_id="j")
    assert rows(registry) == 0 and folders(registry) == []


def test_a_failed_insert_leaves_no_row_and_no_folder(tmp_path, registry, monkeypatch) -> None:
    run = finished_run(tmp_path / "run")
    registry.register("crash", run, job_id="j0")

    def insert(self, conn, row):  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(SpecialistRegistry, "_insert", insert)
    with pytest.raises(sqlite3.OperationalError):
        registry.register("crash", run, job_id="j1")
    assert rows(registry) == 1 and folders(registry) == ["crash/v1"]
    monkeypatch.undo()
    assert registry.register("crash", run, job_id="j2").version == 2  # the failed one took no version


def test_an_uncommitted_version_folder_and_an_abandoned_temp_folder_are_removed_on_open(tmp_path, registry) -> None:
    kept = registry.register("kept", finished_run(tmp_path / "run"), job_id="j")
    # what a crash between the rename and the commit leaves, and a copy whose writer died
    orphan = registry.folders / "kept" / "v2"
    specialists._copy_read_only(kept.path, orphan)
    abandoned = registry.folders / "kept" / ".tmp-999999999-0badc0de-00000000"
    specialists._copy_read_only(kept.path, abandoned)
    reopened = SpecialistRegistry(registry.state_dir)
    assert folders(reopened) == ["kept/v1"]
    assert [s.ref for s in reopened.list()] == ["kept:1"]
    assert reopened.register("kept", tmp_path / "run", job_id="j2").version == 2


def test_a_temp_folder_of_a_live_writer_is_left_alone(tmp_path, registry) -> None:
    live = registry.folders / "busy" / f".tmp-{os.getpid()}-{specialists._NONCE}-00000000"
    live.mkdir(parents=True)
    SpecialistRegistry(registry.state_dir)
    assert live.is_dir()


def test_two_threads_registering_at_once_get_versions_one_and_two(tmp_path, registry) -> None:
    run = finished_run(tmp_path / "run")
    start = threading.Barrier(2)
    got: list[int] = []
    errors: list[BaseException] = []

    def register(job_id: str) -> None:
        try:
            start.wait()
            got.append(registry.register("race", run, job_id=job_id).version)
        except BaseException as err:  # noqa: BLE001 (reported by the assertion below)
            errors.append(err)

    threads = [threading.Thread(target=register, args=(f"j{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(got) == [1, 2]
    assert folders(registry) == ["race/v1", "race/v2"]


# ---- continued training --------------------------------------------------------------


def test_export_then_load_gives_the_same_arrays(tmp_path) -> None:
    cfg = config(tmp_path)
    run = finished_run(tmp_path / "run", seed=5)
    job = Job(ScriptedGrid({}), cfg)
    loaded = load_init_adapter(run / "specialist", job.layout, cfg.lora, job.fingerprint)
    expected = trained_adapter(cfg.lora, 5)
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == np.float32 and np.array_equal(loaded[name], value)


def test_in_model_peft_names_map_to_the_saved_state_names() -> None:
    a = np.ones((2, 3), np.float32)
    named = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": a}
    assert list(adapter_from_peft_state(named)) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]


def test_a_job_continues_from_a_registered_specialist(tmp_path, registry) -> None:
    parent = registry.register("topics", finished_run(tmp_path / "run1", seed=7), job_id="j1")
    cfg = config(tmp_path / "run2", init_adapter=str(parent.path), job_id="continued")
    cfg.validate()
    job = Job(ScriptedGrid({1: honest(0.1), 2: honest(0.3)}), cfg)
    final = job.run()

    round0 = job.store.load(0).adapter
    expected = trained_adapter(cfg.lora, 7)
    assert sorted(round0) == sorted(expected)
    assert all(np.array_equal(round0[name], value) for name, value in expected.items())  # not a fresh adapter
    assert all(np.allclose(final.adapter[name], value + 0.2, atol=1e-6) for name, value in expected.items())

    # what server/app.py records, and the registry reads back as the next version's parent
    start = init_adapter_provenance(cfg.init_adapter)
    assert start["init_adapter"] == {"path": str(parent.path.resolve()), "adapter_sha256": parent.adapter_sha256,
                                     "specialist": "topics:1", "job_id": "job-7"}
    child = registry.register("topics", finished_run(tmp_path / "run2", seed=8, **start), job_id="continued")
    assert child.ref == "topics:2" and child.parent == "topics:1"
    assert init_adapter_provenance("") == {}


def test_a_resumed_job_ignores_init_adapter(tmp_path, registry) -> None:
    parent = registry.register("topics", finished_run(tmp_path / "run1", seed=7), job_id="j1")
    grid = ScriptedGrid({1: honest(0.1), 2: honest(0.3)})
    Job(grid, config(tmp_path / "run2", num_rounds=1)).run()   # a fresh adapter, checkpointed
    fresh = Job(grid, config(tmp_path / "run2")).store.load(1).adapter
    resumed = Job(grid, config(tmp_path / "run2", num_rounds=2, init_adapter=str(parent.path)))
    state = resumed._resume_or_init()
    assert state.server_round == 1
    assert all(np.array_equal(state.adapter[name], value) for name, value in fresh.items())  # the checkpoint wins


def test_an_init_adapter_of_another_rank_is_refused_by_name(tmp_path, registry) -> None:
    other = registry.register("rank8", finished_run(tmp_path / "run1", lora=LoraSpec(rank=8, alpha=16.0)),
                              job_id="j")
    cfg = config(tmp_path / "run2", init_adapter=str(other.path))   # lora-r=4
    with pytest.raises(JobConfigError, match=r"LoRA rank is 8, this job's \(lora-r\) is 4"):
        Job(ScriptedGrid({1: honest(0.1), 2: honest(0.3)}), cfg).run()


def test_an_init_adapter_of_another_base_model_is_refused(tmp_path) -> None:
    run = finished_run(tmp_path / "run1", base_model_fingerprint="blake2b:another-base-model")
    cfg = config(tmp_path / "run2")
    job = Job(ScriptedGrid({}), cfg)
    with pytest.raises(JobConfigError, match="trained on another base model"):
        load_init_adapter(run / "specialist", job.layout, cfg.lora, job.fingerprint)
    shrunk = {name: (shape[0] + 1, shape[1]) for name, shape in job.layout.items()}   # other hidden sizes
    with pytest.raises(JobConfigError, match=r"tensor '.*lora_A.weight' has shape \(4, \d+\), this job's model needs"):
        load_init_adapter(run / "specialist", shrunk, cfg.lora)


def test_a_missing_init_adapter_folder_is_a_config_error(tmp_path) -> None:
    with pytest.raises(JobConfigError, match="init-adapter=.*no such folder"):
        JobConfig.from_run_config({"init-adapter": str(tmp_path / "nowhere")})
