"""The SuperLink's database pacing (server/linkstate_pacing.py), on Flower's own SQL LinkState over a
file database: sessions one at a time, status reads' token cleanup throttled and nothing else's, and a
refusal where the installed Flower lacks what is replaced."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.corestate.sql_corestate import SqlCoreState
from flwr.supercore.sql_mixin import SqlMixin
from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories

from server import linkstate_pacing
from server.linkstate_pacing import FlowerPacingUnsupported


@pytest.fixture
def restore_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pacing rebinds methods of Flower's classes; monkeypatch puts the originals back."""
    for owner, name in ((SqlMixin, "session"), (SqlCoreState, "_cleanup_expired_task_tokens"),
                        (SqlLinkState, "get_run_status"), (SqlLinkState, "get_run_info")):
        monkeypatch.setattr(owner, name, getattr(owner, name))


def link_state(path: Path) -> tuple[SqlLinkState, int]:
    _, factory = get_objectstore_linkstate_factories(str(path), get_federation_manager(is_simulation=False))
    state = factory.state()
    return state, state.create_run(None, None, None, {}, "default", None, None, "serverapp")


def session_spans(state: SqlLinkState, threads: int = 3, hold: float = 0.05) -> list[tuple[float, float]]:
    """Each thread opens a session, reads inside it (`get_object`: a nested session) and holds it."""
    spans: list[tuple[float, float]] = []
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        with state.session():
            began = time.monotonic()
            state.get_object(0, "0" * 64)
            time.sleep(hold)
            spans.append((began, time.monotonic()))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert len(spans) == threads
    return sorted(spans)


def overlapping(spans: list[tuple[float, float]]) -> bool:
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


def test_sessions_run_one_at_a_time_and_nest(tmp_path: Path, restore_flower: None) -> None:
    state, _ = link_state(tmp_path / "state.db")
    assert overlapping(session_spans(state))  # Flower as is: each thread its own session at once
    lock = linkstate_pacing.serialize_sessions()
    spans = session_spans(state)
    assert not overlapping(spans)
    assert not lock._is_owned()  # type: ignore[attr-defined]  # released after every session
    linkstate_pacing.serialize_sessions()  # applied twice: still one lock, not two nested wrappers
    assert linkstate_pacing.flower_original(SqlMixin.session).__qualname__ == "SqlMixin.session"


def test_a_failed_transaction_releases_the_lock_and_rolls_back(tmp_path: Path, restore_flower: None) -> None:
    state, run_id = link_state(tmp_path / "state.db")
    lock = linkstate_pacing.serialize_sessions()
    before = state.get_run_info(run_ids=[run_id])[0].bytes_sent
    with pytest.raises(RuntimeError, match="boom"), state.session():
        state.store_traffic(run_id, bytes_sent=10, bytes_recv=0)
        raise RuntimeError("boom")
    assert not lock._is_owned()  # type: ignore[attr-defined]
    assert state.get_run_info(run_ids=[run_id])[0].bytes_sent == before
    state.store_traffic(run_id, bytes_sent=10, bytes_recv=0)
    assert state.get_run_info(run_ids=[run_id])[0].bytes_sent == before + 10


def count_cleanups(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    calls: list[float] = []
    original = SqlCoreState._cleanup_expired_task_tokens

    def counted(self) -> None:
        calls.append(time.monotonic())
        original(self)

    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", counted)
    return calls


def test_status_reads_clean_up_at_most_once_per_interval(tmp_path: Path, restore_flower: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    state, run_id = link_state(tmp_path / "state.db")
    calls = count_cleanups(monkeypatch)
    state.get_run_status({run_id})
    state.get_run_status({run_id})
    assert len(calls) == 2  # Flower as is: every status read cleans up (a write transaction)
    calls.clear()
    linkstate_pacing.throttle_status_cleanup(min_interval=0.3)
    for _ in range(5):
        assert state.get_run_status({run_id})[run_id].status  # the reads still answer
        state.get_run_info(run_ids=[run_id])
    assert len(calls) == 1
    time.sleep(0.35)
    state.get_run_status({run_id})
    assert len(calls) == 2


def test_calls_that_change_a_task_still_clean_up_every_time(tmp_path: Path, restore_flower: None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    state, run_id = link_state(tmp_path / "state.db")
    calls = count_cleanups(monkeypatch)
    linkstate_pacing.throttle_status_cleanup(min_interval=60)
    state.get_run_status({run_id})
    assert len(calls) == 1
    task_id = state.get_run_info(run_ids=[run_id])[0].primary_task_id  # throttled: no cleanup
    assert len(calls) == 1
    for _ in range(3):
        state.acknowledge_task_heartbeat(task_id)
    assert len(calls) == 4


@pytest.mark.parametrize("owner, name", [(SqlMixin, "session"), (SqlLinkState, "get_run_status"),
                                         (SqlCoreState, "_cleanup_expired_task_tokens")])
def test_a_flower_without_what_is_replaced_is_refused(owner: type, name: str, restore_flower: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(owner, name)
    with pytest.raises(FlowerPacingUnsupported, match=name):
        linkstate_pacing.serialize_sessions() if owner is SqlMixin else linkstate_pacing.throttle_status_cleanup()


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan"), float("inf")])
def test_an_interval_that_would_switch_the_cleanup_off_is_refused(interval: float, restore_flower: None) -> None:
    with pytest.raises(ValueError, match="min_interval"):
        linkstate_pacing.throttle_status_cleanup(min_interval=interval)


def test_a_cleanup_that_failed_is_tried_again_by_the_next_status_read(tmp_path: Path, restore_flower: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    state, run_id = link_state(tmp_path / "state.db")
    calls = count_cleanups(monkeypatch)
    failing = [True]
    counted = SqlCoreState._cleanup_expired_task_tokens

    def flaky(self) -> None:
        counted(self)
        if failing.pop() if failing else False:
            raise RuntimeError("database is locked")

    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", flaky)
    linkstate_pacing.throttle_status_cleanup(min_interval=60)
    with pytest.raises(RuntimeError, match="locked"):
        state.get_run_status({run_id})
    state.get_run_status({run_id})  # within the interval, yet the failed one did not count
    state.get_run_status({run_id})
    assert len(calls) == 2
