"""global-delta (server/downlink.py, clients/global_cache.py): the global goes down as a quantized
difference from a global the organization proved it holds.

The claims: the coordinator's global and what an organization rebuilds are equal bit for bit,
round after round, in every lossy encoding, with no fixed point; a node that proved nothing gets
the whole global (in fp32 once the global is off the encoding's grid), one that proved the
current global gets no tensor bytes at all; a missing base or a wrong result is a named error,
after which the coordinator sends the whole global; a resumed job sends in full and continues
from its checkpoint exactly; the report says the delta was on.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from clients.global_cache import GlobalCache
from protos import codec, global_delta
from protos.encodings import ENCODINGS
from protos.round_config import CONFIG_RECORD, RoundConfig
from server.downlink import Downlink, on_grid
from server.job import Job
from test_round_loop import ScriptedGrid, config
from codec_wire import packed_bytes

GLOBAL = codec.Kind.Value("GLOBAL")
UPDATE = codec.Kind.Value("UPDATE")
LOSSY = ("q8", "q4", "int8", "fp16")


def _adapter(rng: np.random.Generator, magnitude: float = 0.05) -> dict[str, np.ndarray]:
    return {"m.q_proj.lora_A.weight": (rng.standard_normal((8, 96)) * magnitude).astype(np.float32),
            "m.q_proj.lora_B.weight": (rng.standard_normal((96, 8)) * magnitude
                                       * rng.uniform(0, 1, (96, 1)) ** 4).astype(np.float32),
            "m.v_proj.lora_B.weight": np.zeros((32, 8), np.float32)}


def _message(push, server_round: int = 1) -> RecordDict:  # type: ignore[no-untyped-def]
    from protos.adapter import LoraSpec

    return codec.encode(None, kind=GLOBAL, job_id="j", server_round=server_round, fingerprint="fp", lora=LoraSpec(),
                        tensors=push.tensors, global_digest=push.global_digest, base_digest=push.base_digest)


def _receive(cache: GlobalCache, push, server_round: int = 1) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return cache.resolve(*codec.decode(_message(push, server_round)))[1]


def _push_for(downlink: Downlink, node: int):  # type: ignore[no-untyped-def]
    [(push, nodes)] = downlink.pushes([node])
    assert nodes == [node]
    return push


def _same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype == np.float32
                                    and np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)) for k in a)


@pytest.mark.parametrize("name", LOSSY)
def test_the_held_global_is_what_organizations_rebuild_bit_for_bit_round_after_round(name: str) -> None:
    rng = np.random.default_rng(3)
    downlink = Downlink(name, delta=True)
    held = downlink.hold(on_grid(_adapter(rng), name))
    follower, newcomer = GlobalCache(), GlobalCache()   # proves every global / never proves anything
    received = _receive(follower, _push_for(downlink, 1), 0)
    assert _same_bits(received, held)
    downlink.prove(1, global_delta.digest(received))
    encoding = ENCODINGS.get(name)
    for server_round in range(1, 7):
        aggregate = {k: v + (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in held.items()}
        base, held = held, downlink.advance(aggregate)
        # within the encoding's bound of the aggregate: the error is that of the difference, not the global
        for key, value in held.items():
            assert np.max(np.abs(value - aggregate[key]), initial=0.0) <= (
                encoding.max_abs_error(aggregate[key] - base[key]) * 1.01 + 1e-7)
        push = _push_for(downlink, 1)
        assert push.base_digest == global_delta.digest(base) and push.tensors.specs
        assert {spec.encoding for spec in push.tensors.specs} == {codec.encoding_from_name(name)}
        received = _receive(follower, push, server_round)
        assert _same_bits(received, held) and downlink.digest == global_delta.digest(received)
        downlink.prove(1, downlink.digest)
        again = _push_for(downlink, 1)   # the next instruction carries the same global: digests only
        assert again.base_digest == again.global_digest == downlink.digest and not again.tensors.specs
        assert _same_bits(_receive(follower, again, server_round + 1), held)
        # a node that proved nothing: the whole global, in fp32 now that it is off the grid, exact too
        full = _push_for(downlink, 2)
        assert full.base_digest == "" and {s.encoding for s in full.tensors.specs} == {codec.encoding_from_name("fp32")}
        assert _same_bits(_receive(newcomer, full, server_round), held)


def test_the_starting_global_goes_in_full_in_the_jobs_encoding_to_a_node_that_proved_nothing() -> None:
    downlink = Downlink("q4", delta=True)
    start = downlink.hold(on_grid(_adapter(np.random.default_rng(1)), "q4"))
    push = _push_for(downlink, 7)
    assert push.base_digest == "" and push.global_digest == global_delta.digest(start)
    assert {spec.encoding for spec in push.tensors.specs} == {codec.encoding_from_name("q4")}   # on the grid
    assert _same_bits(_receive(GlobalCache(), push, 0), start)


def test_a_missing_base_or_a_wrong_global_is_a_named_error_and_the_node_then_gets_the_whole_global() -> None:
    rng = np.random.default_rng(5)
    downlink = Downlink("q8", delta=True)
    held = downlink.hold(on_grid(_adapter(rng), "q8"))
    cache = GlobalCache()
    _receive(cache, _push_for(downlink, 1), 0)
    downlink.prove(1, downlink.digest)
    downlink.advance({k: v + np.float32(0.01) for k, v in held.items()})
    delta = _push_for(downlink, 1)
    restarted = GlobalCache()   # the organization lost what it held
    with pytest.raises(global_delta.GlobalBaseMissing, match="does not hold"):
        _receive(restarted, delta)
    forged = replace(delta, global_digest="0" * 64)
    with pytest.raises(global_delta.GlobalDigestMismatch, match="announces"):
        _receive(cache, forged)
    assert len(cache.held()) == 1   # nothing wrong is kept
    downlink.prove(1, "")   # its reply was an error: the coordinator assumes it holds nothing
    full = _push_for(downlink, 1)
    assert full.base_digest == "" and _same_bits(_receive(restarted, full), downlink.current)


def test_the_cache_keeps_the_last_two_globals_read_only() -> None:
    cache = GlobalCache()
    adapters = [_adapter(np.random.default_rng(seed)) for seed in range(3)]
    for adapter in adapters:
        cache.hold(global_delta.digest(adapter), adapter)
    assert cache.held() == [global_delta.digest(a) for a in adapters[1:]]
    held = cache._held[cache.held()[0]]
    with pytest.raises(ValueError):
        held["m.v_proj.lora_B.weight"][0, 0] = 1.0


def _tensor_bytes(content: RecordDict) -> int:
    return packed_bytes(content)   # inline or in the Array: wherever the blob's size puts it


def _org(seed: int, cache: GlobalCache, seen: list[dict],  # type: ignore[no-untyped-def]
         forget_at: tuple[str, int] | None = None):
    """An organization like clients/round_work.py: rebuilds the global in ``cache``, proves its digest."""
    rng = np.random.default_rng(seed)

    def handle(message: Message) -> Message:
        cfg = RoundConfig.from_record(message.content.config_records[CONFIG_RECORD])
        kind = message.metadata.message_type
        if forget_at == (kind, cfg.server_round):
            cache.clear()   # a restarted organization
        header, payload = codec.decode(message.content)
        record = {"kind": kind, "round": cfg.server_round, "base": header.base_digest,
                  "tensor_bytes": _tensor_bytes(message.content)}
        seen.append(record)
        try:
            header, global_adapter = cache.resolve(header, payload)
        except global_delta.GlobalDeltaError as err:
            record["error"] = type(err).__name__
            return Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=message)
        record["global"] = {k: np.array(v) for k, v in global_adapter.items()}
        if kind == "evaluate":
            org = ConfigRecord({"name": f"org-{seed}", global_delta.EVAL_DIGEST_KEY: header.global_digest})
            return Message(RecordDict({"metrics": MetricRecord({"num_examples": 4.0, "loss": 1.0, "accuracy": 0.5}),
                                       "organization": org}), reply_to=message)
        update = {k: v + (rng.normal(size=v.shape) * 0.05).astype(np.float32) for k, v in global_adapter.items()}
        content = codec.encode(update, kind=UPDATE, job_id=cfg.job_id, server_round=cfg.server_round,
                               fingerprint=header.base_model_fingerprint, lora=cfg.lora, num_examples=10,
                               encoding=codec.encoding_from_name(cfg.update_encoding),
                               global_digest=header.global_digest)
        return Message(content, reply_to=message)

    return handle


def test_a_job_sends_deltas_and_digests_and_ends_with_the_global_every_organization_scored(tmp_path: Path) -> None:
    seen: dict[int, list[dict]] = {1: [], 2: []}
    grid = ScriptedGrid({node: _org(node, GlobalCache(), seen[node]) for node in seen})
    final = Job(grid, config(tmp_path / "delta", num_rounds=3, update_encoding="q4", global_encoding="q8",
                             global_delta=True)).run()
    plain_seen: dict[int, list[dict]] = {1: [], 2: []}
    Job(ScriptedGrid({node: _org(node, GlobalCache(), plain_seen[node]) for node in plain_seen}),
        config(tmp_path / "plain", num_rounds=3, update_encoding="q4", global_encoding="q8")).run()
    for records in seen.values():
        assert [(r["kind"], r["round"]) for r in records] == [
            ("evaluate", 0), ("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2), ("train", 3),
            ("evaluate", 3)]
        assert records[0]["base"] == "" and records[0]["tensor_bytes"] > 0   # round 0: in full
        for train in records[1::2]:   # the global it evaluated just before: digests, no tensor bytes
            assert train["base"] and train["tensor_bytes"] == 0
        for evaluate, train in zip(records[2::2], records[1::2]):   # a delta from the global it trained from
            assert evaluate["base"] and 0 < evaluate["tensor_bytes"] < records[0]["tensor_bytes"] * 1.01
            assert global_delta.digest(train["global"]) == evaluate["base"]
        assert _same_bits(records[-1]["global"], final.adapter)   # scored = held = exported, bit for bit
    # the global's bytes (the tiny model's rank-4 adapter is small beside each message's header and
    # round config): one full copy and three deltas, against seven full copies
    down = sum(r["tensor_bytes"] for records in seen.values() for r in records)
    down_plain = sum(r["tensor_bytes"] for records in plain_seen.values() for r in records)
    assert down * 1.6 < down_plain, (down, down_plain)


def test_an_organization_that_lost_its_base_fails_by_name_and_gets_the_whole_global_in_the_same_round(
        tmp_path: Path) -> None:
    seen: dict[int, list[dict]] = {1: [], 2: [], 3: []}
    handlers = {node: _org(node, GlobalCache(), seen[node], forget_at=("train", 2) if node == 3 else None)
                for node in seen}
    final = Job(ScriptedGrid(handlers), config(tmp_path, num_rounds=2, global_encoding="q4", global_delta=True,
                                               min_nodes=2)).run()
    round2 = final.run_state["history"][2]
    assert round2["rejected"] == [] and len(round2["accepted"]) == 3   # its update was not lost
    trains = [r for r in seen[3] if (r["kind"], r["round"]) == ("train", 2)]
    assert [r.get("error") for r in trains] == ["GlobalBaseMissing", None]
    assert trains[0]["base"] and trains[1]["base"] == ""   # then the whole global, in fp32, rebuilt exactly
    after = [r for r in seen[3] if (r["kind"], r["round"]) == ("evaluate", 2)][0]
    assert after["base"] and "error" not in after   # it proved the whole global: a delta again
    assert _same_bits(after["global"], final.adapter)


def test_a_peer_that_keeps_claiming_a_missing_base_gets_one_whole_global_per_exchange(tmp_path: Path) -> None:
    seen: dict[int, list[dict]] = {1: [], 2: []}
    honest = _org(1, GlobalCache(), seen[1])

    def liar(message: Message) -> Message:
        seen[2].append({"kind": message.metadata.message_type})
        return Message(Error(code=1, reason="GlobalBaseMissing: (claimed)"), reply_to=message)

    final = Job(ScriptedGrid({1: honest, 2: liar}), config(tmp_path, num_rounds=1, global_encoding="q8",
                                                          global_delta=True, min_nodes=1)).run()
    assert [r["kind"] for r in seen[2]] == ["evaluate", "evaluate", "train", "train", "evaluate", "evaluate"]
    round1 = final.run_state["history"][1]
    assert [r["reason"] for r in round1["rejected"]] == ["client_error"]
    assert "GlobalBaseMissing" in round1["rejected"][0]["detail"]


def test_a_resumed_job_sends_in_full_and_continues_from_its_checkpoint_exactly(tmp_path: Path) -> None:
    seen: dict[int, list[dict]] = {1: [], 2: []}
    caches = {node: GlobalCache() for node in seen}
    grid = ScriptedGrid({node: _org(node, caches[node], seen[node]) for node in seen})
    first = Job(grid, config(tmp_path, num_rounds=1, global_encoding="int8", global_delta=True)).run()
    for records in seen.values():
        records.clear()
    final = Job(grid, config(tmp_path, num_rounds=2, global_encoding="int8", global_delta=True)).run()
    for records in seen.values():
        assert [(r["kind"], r["round"], bool(r["base"])) for r in records] == [
            ("train", 2, False), ("evaluate", 2, True)]   # no proof survives a restart: in full first
        assert _same_bits(records[0]["global"], first.adapter)   # the checkpoint exactly as held
        assert _same_bits(records[1]["global"], final.adapter)


def test_the_report_and_provenance_say_the_global_went_as_a_delta(tmp_path: Path) -> None:
    from server.app import run_job

    grid = ScriptedGrid({node: _org(node, GlobalCache(), []) for node in (1, 2)})
    out = run_job(grid, config(tmp_path, update_encoding="q4", global_encoding="q8", global_delta=True))
    expected = {"update": "q4", "global": "q8", "global_delta": True}
    assert json.loads((out / "provenance.json").read_text())["encodings"] == expected
    assert json.loads((tmp_path / "report.json").read_text())["encodings"] == expected


@pytest.mark.slow
def test_a_simulated_job_with_global_delta_runs_end_to_end(tmp_path: Path) -> None:
    """The tiny scenario on Flower's Simulation Engine: organizations rebuild every delta (no reply
    refused), and the trained rounds move fewer bytes down than the same job without the delta."""
    from simulations.runner import run_scenario
    from simulations.scenario import Scenario
    from server.job_config import JobConfig

    def run(name: str, delta: bool) -> dict:
        cfg = JobConfig(model="tiny-llama", job_id="delta-sim", num_rounds=2, min_nodes=3, local_steps=1,
                        batch_size=2, max_length=64, eval_max_examples=4, sim_max_records=20,
                        run_dir=str(tmp_path / name), update_encoding="q4", global_encoding="q8", global_delta=delta)
        run_scenario(Scenario(name="test", num_organizations=3, run_config={}), cfg, None)
        return json.loads((tmp_path / name / "report.json").read_text())

    delta, plain = run("delta", True), run("plain", False)
    for history in delta["history"]:
        assert not history.get("rejected") and not history["eval_rejected"]
    assert delta["encodings"]["global_delta"] is True
    trained_down = lambda report: sum(h["bytes"]["down"] for h in report["history"] if h["round"] > 0)  # noqa: E731
    assert trained_down(delta) * 1.5 < trained_down(plain)


def test_secure_aggregation_trains_from_the_whole_global_and_evaluates_from_deltas(tmp_path: Path) -> None:
    """Under secure aggregation one train content serves every organization: it goes in full
    (fp32 once off the grid), and the job reaches the plain job's adapter as without the delta."""
    from test_secure_round import SecureGrid, _job_config

    nodes = [21, 22, 23, 24, 25]
    deltas, weights = {n: 0.001 * (i + 1) for i, n in enumerate(nodes)}, {n: 7 * (i + 1) for i, n in enumerate(nodes)}
    settings = dict(global_encoding="q8", global_delta=True)
    plain = Job(SecureGrid(deltas, weights), _job_config(tmp_path / "plain", **settings)).run()
    grid = SecureGrid(deltas, weights)
    secure = Job(grid, _job_config(tmp_path / "secure", secure_aggregation=True, **settings)).run()
    assert sorted(grid.trained) == sorted(nodes * 2)
    for history in secure.run_state["history"][1:]:
        assert history["accepted"] == [f"org-{n}" for n in nodes] and history["rejected"] == []
    # the masked sum differs from the plain one by ~1e-6, which may flip one rounding of the
    # delta's 8-bit codes: one code step (the block's scale, ~1e-4 here) apart at most
    for name, value in plain.adapter.items():
        np.testing.assert_allclose(secure.adapter[name], value, rtol=0, atol=3e-4)
