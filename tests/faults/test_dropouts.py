"""Organizations that die, stall, drop a round or come back — against a fake fleet.

Same coordinator code as in production (server/job.py, exchange.py), forked
per run; the fleet (faultkit.FakeFleet) behaves as Flower does towards the
coordinator: a dead node keeps being listed until its heartbeats are overdue
(``offline_after``), then its instructions get a NODE_UNAVAILABLE error
reply; a restarted agent registers under a new node id; a reply that comes
after the deadline waits on the "SuperLink" until someone pulls it.
The same faults on real processes: test_deployment_faults.py (`make faults`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from faultkit import FakeOrg, history, log_text, orgs, run_forked

from server.checkpoint import CheckpointStore


def test_30_percent_killed_mid_round_every_round_completes_by_its_deadline(tmp_path: Path) -> None:
    fleet = orgs(10)
    for org in fleet[:3]:
        org.dies_in_round = 2  # SIGKILLed while training round 2; never back
    timeout = 2.0
    code = run_forked(tmp_path, fleet, num_rounds=4, min_nodes=7, min_replies=7, round_timeout=timeout,
                      offline_after=0.5, strategy="fedavg", strategy_params="")
    assert code == 0, log_text(tmp_path)[-3000:]
    rounds = history(tmp_path)[1:]
    assert [h["round"] for h in rounds] == [1, 2, 3, 4]
    dead = {"org-0", "org-1", "org-2"}
    assert len(rounds[0]["accepted"]) == 10
    for h in rounds[1:]:
        assert len(h["accepted"]) == 7 and not dead & set(h["accepted"])
        assert h["train_seconds"] <= timeout + 0.5, f"round {h['round']} overran its deadline"
    lost = {r["org"] for r in rounds[1]["rejected"]} | set(rounds[1]["timed_out"])
    assert lost == dead
    for rejection in rounds[1]["rejected"]:  # Flower's own "node unavailable" answer, named as such
        assert rejection["reason"] == "client_error" and "Node Unavailable" in rejection["detail"], rejection
    assert all(h["sampled"] == 7 for h in rounds[2:]), "dead organizations were sampled again"


def test_below_quorum_the_round_is_retried_with_a_fresh_sample(tmp_path: Path) -> None:
    fleet = orgs(3)
    fleet[2].drops = {2: 1}  # its first round-2 instruction is lost; it answers the retry
    code = run_forked(tmp_path, fleet, num_rounds=3, round_timeout=0.5, round_retries=1)
    assert code == 0, log_text(tmp_path)[-3000:]
    rounds = history(tmp_path)[1:]
    assert [h["attempts"] for h in rounds] == [1, 2, 1]
    assert all(len(h["accepted"]) == 3 for h in rounds)
    assert re.search(r"round 2: 2 valid update\(s\), quorum is 3 .*retrying the round with a fresh sample "
                     r"\(retry 1 of 1\)", log_text(tmp_path))


def test_below_quorum_after_the_retries_the_run_stops_with_a_clear_message(tmp_path: Path) -> None:
    fleet = orgs(3)
    fleet[2].drops = {2: 99}
    started = time.monotonic()
    code = run_forked(tmp_path, fleet, num_rounds=3, round_timeout=0.5, round_retries=2)
    elapsed = time.monotonic() - started
    assert code == 1
    assert elapsed < 3 * 0.5 + 15, "never a hang: 3 attempts of 0.5 s each"
    text = log_text(tmp_path)
    assert re.search(r"coordinator stopped: QuorumError: round 2: 2 valid update\(s\), quorum is 3 .*"
                     r"gave up after 3 attempt\(s\) \(round-retries=2\)\. The last checkpoint is intact", text), text[-2000:]
    assert CheckpointStore(tmp_path / "checkpoints").rounds() == [0, 1]


def test_too_few_organizations_online_stops_with_a_clear_message(tmp_path: Path) -> None:
    fleet = orgs(2)
    code = run_forked(tmp_path, fleet, num_rounds=2, min_nodes=3, node_wait_timeout=1.0)
    assert code == 1
    assert "only 2 organization(s) online after 1s; min-nodes=3" in log_text(tmp_path)


def test_a_restarted_organization_rejoins_and_takes_part_in_later_rounds(tmp_path: Path) -> None:
    fleet = orgs(4)
    fleet[3].dies_in_round = 2
    fleet[3].rejoins_after_round = 3  # back (new node id) once round 3 is evaluated
    code = run_forked(tmp_path, fleet, num_rounds=5, min_nodes=3, min_replies=3, round_timeout=1.5,
                      offline_after=0.3)
    assert code == 0, log_text(tmp_path)[-3000:]
    took_part = {h["round"]: "org-3" in h["accepted"] for h in history(tmp_path)[1:]}
    assert took_part == {1: True, 2: False, 3: False, 4: True, 5: True}


def straggler_run(run_dir: Path, late: bool) -> int | None:
    """org-2 is slow in round 1: past the deadline (late=True) or never answering (late=False)."""
    fleet = [FakeOrg(name=f"org-{i}", index=i, num_examples=10 * (i + 1), delay=lambda r, kind: 0.2)
             for i in range(2)]
    if late:
        fleet.append(FakeOrg(name="org-2", index=2, num_examples=30,
                             delay=lambda r, kind: 1.6 if (r, kind) == (1, "train") else 0.2))
    else:
        fleet.append(FakeOrg(name="org-2", index=2, num_examples=30, delay=lambda r, kind: 0.2, drops={1: 1}))
    return run_forked(run_dir, fleet, num_rounds=5, min_nodes=3, min_replies=2, round_timeout=0.8)


def test_a_late_reply_is_discarded_with_a_log_line_and_does_not_touch_the_next_round(tmp_path: Path) -> None:
    assert straggler_run(tmp_path / "late", late=True) == 0, log_text(tmp_path / "late")[-3000:]
    assert straggler_run(tmp_path / "lost", late=False) == 0, log_text(tmp_path / "lost")[-3000:]
    rounds = history(tmp_path / "late")[1:]
    assert rounds[0]["timed_out"] == ["org-2"] and sorted(rounds[0]["accepted"]) == ["org-0", "org-1"]
    assert all(len(h["accepted"]) == 3 and not h["rejected"] for h in rounds[1:])
    discarded = [(h["round"], entry) for h in rounds for entry in h["late_replies"]]
    assert len(discarded) == 1
    assert discarded[0][1]["node"] == "org-2" and "round 1 train" in discarded[0][1]["instruction"]
    assert re.search(r"late reply from org-2 to the round 1 train instruction arrived after its deadline: "
                     r"discarded", log_text(tmp_path / "late"))
    # The late reply changed nothing: the same adapter as when it never came at all.
    got = CheckpointStore(tmp_path / "late" / "checkpoints").latest()
    want = CheckpointStore(tmp_path / "lost" / "checkpoints").latest()
    assert got is not None and want is not None
    for name, value in want.adapter.items():
        assert np.array_equal(got.adapter[name], value), name
