"""benchmarks/deployment.py's `--trace`: the message path split at each hop from the probes' stamps and
the SuperLink's object requests counted; and a message moving as few Flower objects as its tensors allow."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from protos import codec
from protos.adapter import LoraSpec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("deployment_bench", ROOT / "benchmarks" / "deployment.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def probe_functions(bench) -> dict:  # type: ignore[no-untyped-def]
    """The probe's definitions, without its start (which needs the probe's file)."""
    namespace: dict = {}
    exec(compile(bench.PROBE.split("\nif _FILE:")[0], "probe", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.mark.parametrize("placement", ["inline", "array"])
def test_a_message_moves_as_few_flower_objects_whatever_its_tensor_count(placement: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The codec packs every tensor in one blob (protocol 3): inline in the header record for a small
    message, else one Array and one chunk for the message; never one object per tensor, as the
    --pack-tensors experiment measured."""
    if placement == "array":
        monkeypatch.setattr(codec, "INLINE_LIMIT", 0)  # what a blob above the limit takes
    rng = np.random.default_rng(0)
    names = [f"m.layers.{i}.{p}_proj.lora_{ab}.weight" for i in range(2) for p in "qv" for ab in "AB"]
    adapter = {name: rng.normal(size=(4, 16) if name.endswith("A.weight") else (16, 4)).astype(np.float32)
               for name in names}
    kwargs = dict(kind=codec.Kind.Value("UPDATE"), job_id="job", server_round=2, fingerprint="fp",
                  lora=LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), num_examples=7)
    for some in (names[:1], names):
        content = codec.encode({name: adapter[name] for name in some}, **kwargs)
        # RecordDict, header ConfigRecord (the blob inline); or + tensors ArrayRecord, the packed Array, its chunk
        assert len(get_all_nested_objects(content)) == (2 if placement == "inline" else 5)
        header, back = codec.decode(content)
        assert header.num_examples == 7 and sorted(back) == sorted(some)
        assert all(np.array_equal(back[name], adapter[name]) for name in some)


def test_the_pack_experiment_is_gone(bench) -> None:  # type: ignore[no-untyped-def]
    assert "_pack" not in probe_functions(bench) and "SILOTUNE_BENCH_PACK" not in bench.PROBE


def test_object_requests_are_counted_by_kind(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _write(tmp_path / "probe-coordinator.jsonl", [
        {"what": "fleet_pull_object"}, {"what": "fleet_pull_object"}, {"what": "fleet_push_object"},
        {"what": "link_push_object"}, {"what": "grid_push"}, {"what": "process"}])
    assert bench.object_requests(tmp_path) == {"Fleet PullObject": 2, "Fleet PushObject": 1,
                                               "ServerAppIo PushObject": 1, "ServerAppIo PullObject": 0, "total": 4}


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_trace_splits_one_organization_round_at_every_hop(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t = 1000.0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text(
        json.dumps({"event": "round_started", "round": 1, "time": "1970-01-01T00:16:40+00:00"}) + "\n"
        + json.dumps({"event": "reply", "round": 1, "org": "org-0", "accepted": True,
                      "time": "1970-01-01T00:16:45+00:00"}) + "\n")
    (tmp_path / "org-0").mkdir()
    (tmp_path / "org-0" / "supernode.log").write_text("INFO :      SuperNode ID: 42\n")

    def rec(what: str, t0: float, t1: float, **extra: object) -> dict:
        return {"what": what, "t0": t + t0, "t1": t + t1, **extra}

    _write(tmp_path / "probe-coordinator.jsonl", [
        rec("grid_push", 0.1, 0.6), rec("link_push", 0.15, 0.2), rec("fleet_pull", 0.3, 0.35, node=7),
        rec("fleet_pull", 0.4, 0.45, node=42), rec("fleet_push", 3.5, 3.6, node=42),
        rec("grid_pull", 4.0, 4.5, nodes=[42]), rec("grid_pull_objects", 4.1, 4.4)])
    _write(tmp_path / "probe-org-0.jsonl", [
        rec("sn_pulled", 0.0, 1.0), rec("sn_objects", 0.5, 0.9), rec("pulled", 0.95, 1.1),
        rec("handler", 1.2, 3.0), rec("push", 3.1, 3.2), rec("sn_push", 1.0, 3.9), rec("sn_push_objects", 3.6, 3.9)])
    (row,) = bench.trace_legs(tmp_path, run_dir)
    expected = {"push_reply": 5.0, "build": 0.1, "link_stored": 0.1, "grid_objects": 0.4, "sn_pull": 0.25,
                "sn_objects": 0.4, "runner_task": 0.65, "handler": 1.9, "reply_push": 0.2, "sn_reply": 0.4,
                "sn_reply_objects": 0.3, "grid_wait": 0.1, "grid_pull": 0.5, "grid_pull_objects": 0.3,
                "on_reply": 0.5, "sn_push_total": 2.9}
    assert row["org"] == "org-0" and row["round"] == 1
    assert {key: round(row[key], 6) for key in expected} == expected
    assert "| SuperNode pulls the message's objects from the SuperLink | 0.400 |" in bench.trace_table([row])
