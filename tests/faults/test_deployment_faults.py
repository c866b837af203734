"""Faults injected into a real localhost deployment: `silotune coordinator` and
`silotune agent start` as separate processes on 127.0.0.1, tiny model.

* the coordinator SIGKILLed (whole process tree: CLI, SuperLink, SuperExec,
  ServerApp) while pushing, mid-pull, during aggregation, while writing the
  checkpoint and at a random moment — restarted on the same state, it ends
  on the adapter of an uninterrupted run, byte for byte;
* an agent SIGKILLed mid-round (1 of 3), restarted later: every round ends
  by its deadline with the quorum, and the restarted agent takes part again;
* a straggler (its reply held back on a stalled uplink past the deadline):
  its late reply is logged as discarded, the next round is clean;
* below quorum: the round is retried with a fresh sample; when retries run
  out the coordinator stops with a clear message, never hangs, and a restart
  continues from the last checkpoint.

Only the first test (seconds) runs in `make test`; the others take minutes
each on a 2-core CPU and are marked faults_long (`make faults`). Figures
(round times, recovery times) are printed: run with -s to see them.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from netfault import HttpHoldProxy, wait_until

from server.checkpoint import ADAPTER_WEIGHTS, RUN_STATE, STRATEGY_STATE

BASE: dict[str, Any] = {"local-steps": 1, "batch-size": 4, "max-length": 64, "eval-max-examples": 4,
                        "node-wait-timeout": 180, "seed": 7}


def figure(name: str, value: object) -> None:
    print(f"\nFIGURE {name}: {value}", flush=True)


def seed_for(test: str) -> int:
    seed = int(os.environ.get("SILOTUNE_FAULT_SEED", random.randrange(10**6)))
    figure(f"{test} seed (SILOTUNE_FAULT_SEED to replay)", seed)
    return seed


def wait_for_clientapp(d: Any, agent: str, since: float, timeout: float = 300) -> list[psutil.Process]:
    """The agent's ClientApp process(es) started after wall-clock time ``since``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [p for p in d.clientapps(agent) if _created(p) > since]
        if fresh:
            return fresh
        time.sleep(0.1)
    raise AssertionError(f"{agent} started no ClientApp in {timeout}s:\n{d.tail()}")


def _created(proc: psutil.Process) -> float:
    try:
        return proc.create_time()
    except psutil.NoSuchProcess:
        return 0.0


@pytest.mark.slow
def test_coordinator_without_enough_agents_stops_with_a_clear_message(deployment: Any) -> None:
    """Never a hang: no organization comes, the coordinator says so and exits."""
    d = deployment({**BASE, "job-id": "faults-empty", "num-rounds": 2, "min-nodes": 2, "node-wait-timeout": 10},
                   agents=[])
    started = time.monotonic()
    d.start_coordinator()
    code = d.coordinators[-1].wait(timeout=240)
    assert code != 0
    assert time.monotonic() - started < 200
    output = (d.root / "coordinator-0.log").read_text()
    assert "only 0 organization(s) online after 10s; min-nodes=2" in output, output[-3000:]


# ----------------------------------------------------------------------------------- coordinator kills
def checkpoint_bytes(run_dir: Path, server_round: int) -> dict[str, Any]:
    folder = run_dir / "checkpoints" / f"round-{server_round:05d}"
    run_state = json.loads((folder / RUN_STATE).read_text())
    return {
        "adapter": (folder / ADAPTER_WEIGHTS).read_bytes(),
        "strategy": (folder / STRATEGY_STATE).read_bytes(),
        "specialist": (run_dir / "specialist" / ADAPTER_WEIGHTS).read_bytes(),
        "rng": run_state["rng"],
        "took_part": [sorted(h["accepted"]) for h in run_state["history"][1:]],
    }


@pytest.mark.faults_long
@pytest.mark.timeout(3600)
def test_coordinator_sigkilled_anywhere_resumes_byte_identical(deployment: Any) -> None:
    rounds = 6
    settings = {**BASE, "job-id": "faults-coordinator", "num-rounds": rounds, "min-nodes": 2,
                "round-timeout": 300, "strategy": "fedadam", "strategy-params": "eta=0.01"}
    agents = ["bank-a", "bank-b"]
    rng = random.Random(seed_for("coordinator kills"))

    reference = deployment(settings, agents)
    started = time.time()
    reference.start_coordinator()
    reference.start_agents()
    seen = {k: reference.wait_for_round(k, timeout=900) for k in range(rounds + 1)}
    assert reference.coordinators[-1].wait(timeout=300) == 0, reference.tail()
    round_seconds = [seen[k] - seen[k - 1] for k in range(2, rounds + 1)]
    figure("uninterrupted 6-round deployment (s)", round(seen[rounds] - started))
    figure("uninterrupted round duration, min/median/max (s)",
           [round(sorted(round_seconds)[i]) for i in (0, len(round_seconds) // 2, -1)])
    want = checkpoint_bytes(reference.run_dir, rounds)
    assert reference.stop() == []

    # One kill in each of rounds 2..5 (shuffled): while pushing, mid-pull, during aggregation,
    # while writing the checkpoint; then one SIGKILL from outside at a random moment.
    points = ["after-push", "mid-pull", rng.choice(["before-aggregate", "after-aggregate"]),
              f"checkpoint-write#{rng.randint(1, 5)}"]
    schedule = sorted(zip(rng.sample([2, 3, 4, 5], 4), points))
    d = deployment(settings, agents)
    recoveries: list[tuple[str, float]] = []
    for i, (server_round, point) in enumerate(schedule):
        name, _, nth = point.partition("#")
        spec = f"{name}@{server_round}" + (f"#{nth}" if nth else "")
        d.start_coordinator(fault=spec)
        if i == 0:
            d.start_agents()
        if i > 0:  # the restart after the previous kill: time until that round is done again
            previous_round, previous_spec, killed_at = last
            recoveries.append((previous_spec, d.wait_for_round(previous_round, timeout=900) - killed_at))
        mark = d.wait_for_mark(i + 1, timeout=900)
        assert mark[:2] == [name, str(server_round)]
        d.kill_coordinator()
        killed_at = float(mark[3])
        on_disk = d.rounds_on_disk()
        assert server_round not in on_disk and server_round - 1 in on_disk
        if name == "checkpoint-write":  # a torn write is left for the restart to face
            assert list((d.run_dir / "checkpoints").glob(f".tmp-round-{server_round:05d}-*"))
        last = (server_round, spec, killed_at)
    d.start_coordinator()
    previous_round, previous_spec, killed_at = last
    recoveries.append((previous_spec, d.wait_for_round(previous_round, timeout=900) - killed_at))
    # somewhere in round 6: it started when round 5 was checkpointed and lasts about a round,
    # so a delay under the shortest uninterrupted round lands inside it
    time.sleep(rng.uniform(0.1, 0.7) * min(round_seconds))
    done = max(d.rounds_on_disk())
    if done < rounds:
        killed_at = time.time()
        d.kill_coordinator()
        d.start_coordinator()
        recoveries.append((f"random moment in round {done + 1}", d.wait_for_round(done + 1, 900) - killed_at))
    assert d.coordinators[-1].wait(timeout=900) == 0, d.tail()
    figure("kills (fault point, seconds from the kill until that round was checkpointed again)",
           [(spec, round(seconds)) for spec, seconds in recoveries])

    got = checkpoint_bytes(d.run_dir, rounds)
    assert got["took_part"] == want["took_part"]
    assert got["rng"] == want["rng"], "RNG state differs from the uninterrupted run"
    assert got["strategy"] == want["strategy"], "FedAdam moments differ from the uninterrupted run"
    assert got["adapter"] == want["adapter"], "final adapter differs from the uninterrupted run"
    assert got["specialist"] == want["specialist"], "exported specialist differs"


# ----------------------------------------------------------------------------------- agents
@pytest.mark.faults_long
@pytest.mark.timeout(1800)
def test_an_agent_killed_mid_round_then_restarted_rejoins(deployment: Any) -> None:
    """1 of 3 agents (33%) SIGKILLed while training round 2, started again during round 3."""
    timeout = 240
    settings = {**BASE, "job-id": "faults-agents", "num-rounds": 5, "min-nodes": 2, "min-replies": 2,
                "round-timeout": timeout}
    d = deployment(settings, ["bank-a", "bank-b", "bank-c"])
    d.start_coordinator()
    d.start_agents()
    round_1 = d.wait_for_round(1, timeout=900)
    wait_for_clientapp(d, "bank-c", since=round_1)  # its round-2 ClientApp is training now
    time.sleep(1.0)
    killed_at = time.time()
    d.kill_agent("bank-c")
    done_2 = d.wait_for_round(2, timeout=2 * timeout + 120)
    d.start_agent("bank-c")  # same organization, same silo: a restarted agent
    assert d.coordinators[-1].wait(timeout=1200) == 0, d.tail()
    figure("round 2 finished after the agent kill (s)", round(done_2 - killed_at))

    history = d.report()["history"]
    assert [h["round"] for h in history] == [0, 1, 2, 3, 4, 5]
    took_part = {h["round"]: sorted(h["accepted"]) for h in history[1:]}
    figure("organizations accepted per round", took_part)
    assert took_part[1] == ["bank-a", "bank-b", "bank-c"]
    assert took_part[2] == ["bank-a", "bank-b"], "round 2 did not complete with the quorum of survivors"
    assert any("bank-c" in took_part[k] for k in (3, 4, 5)), "the restarted agent never took part again"
    assert "bank-c" in took_part[5]
    for h in history[1:]:
        assert h["train_seconds"] <= timeout + 10, f"round {h['round']} overran its deadline"


@pytest.mark.faults_long
@pytest.mark.timeout(1800)
def test_a_straggler_reply_after_the_deadline_is_discarded(deployment: Any) -> None:
    """bank-c's round-2 reply is held back on its uplink (a proxy) until past the deadline.

    Not a SIGSTOPped ClientApp: Flower's SuperNode gives up on a ClientApp silent for
    60 s and answers for it with an error ("ClientApp stopped responding.") — a crash,
    not a straggler. The stalled uplink keeps heartbeats flowing; only the reply waits
    (the agent times out after 30 s and retries, and the retries wait too), and it gets
    through inside the instruction's TTL (deadline + 60 s), as a late reply.
    """
    timeout = 150
    settings = {**BASE, "job-id": "faults-straggler", "num-rounds": 3, "min-nodes": 3, "min-replies": 2,
                "round-timeout": timeout}
    d = deployment(settings, ["bank-a", "bank-b", "bank-c"])
    proxy = HttpHoldProxy(d.port)
    try:
        d.start_coordinator()
        d.start_agents("bank-a", "bank-b")
        d.start_agent("bank-c", via_port=proxy.port)
        round_1 = d.wait_for_round(1, timeout=900)
        proxy.hold("/v1/fleet/push-messages")  # round 2's train reply is bank-c's next push
        wait_until(round_1 + timeout + 8)       # past the round-2 deadline (it starts after round 1's checkpoint)
        proxy.release()
        assert d.coordinators[-1].wait(timeout=900) == 0, d.tail()
    finally:
        proxy.close()
    figure("straggler: reply pushes held back / let through late", (proxy.held, proxy.forwarded))

    history = d.report()["history"]
    assert history[2]["timed_out"] == ["bank-c"] and sorted(history[2]["accepted"]) == ["bank-a", "bank-b"]
    late = [(h["round"], entry) for h in history[1:] for entry in h.get("late_replies", [])]
    figure("late replies discarded (round, entry)", late)
    assert [(entry["node"], entry["instruction"]) for _, entry in late] == \
        [("bank-c", "the round 2 train instruction")]
    assert sorted(history[3]["accepted"]) == ["bank-a", "bank-b", "bank-c"] and not history[3]["rejected"]
    assert "late reply from bank-c to the round 2 train instruction arrived after its deadline: discarded" \
        in d.run_log()


# ----------------------------------------------------------------------------------- quorum
@pytest.mark.faults_long
@pytest.mark.timeout(1800)
def test_below_quorum_retry_then_a_clear_stop_then_restart(deployment: Any) -> None:
    timeout = 150
    settings = {**BASE, "job-id": "faults-quorum", "num-rounds": 3, "min-nodes": 2, "min-replies": 2,
                "round-timeout": timeout, "round-retries": 1, "node-wait-timeout": 60}
    d = deployment(settings, ["bank-a", "bank-b"])
    d.start_coordinator()
    d.start_agents()
    round_1 = d.wait_for_round(1, timeout=900)
    # Round 2: bank-b dies mid-training and comes straight back (new node id): the retry gets it.
    wait_for_clientapp(d, "bank-b", since=round_1)
    d.kill_agent("bank-b")
    d.start_agent("bank-b")
    round_2 = d.wait_for_round(2, timeout=4 * timeout + 120)
    # Round 3: bank-b dies for good: one retry, then a clear stop.
    wait_for_clientapp(d, "bank-b", since=round_2)
    killed_at = time.time()
    d.kill_agent("bank-b")
    code = d.coordinators[-1].wait(timeout=2 * timeout + 60 + 240)
    stopped_after = time.time() - killed_at
    figure("below quorum: coordinator stopped this long after the agent kill (s)", round(stopped_after))
    output = (d.root / f"coordinator-{len(d.coordinators) - 1}.log").read_text()
    assert code != 0
    assert "QuorumError" in output and ("gave up after 2 attempt(s) (round-retries=1)" in output
                                        or "only 1 organization(s) online" in output), output[-3000:]
    assert d.rounds_on_disk()[-1] == 2
    # The operator restarts the agent and the coordinator: round 3 is retried and the job ends.
    d.start_agent("bank-b")
    d.start_coordinator()
    assert d.coordinators[-1].wait(timeout=900) == 0, d.tail()
    history = d.report()["history"]
    figure("attempts per round", {h["round"]: h.get("attempts") for h in history[1:]})
    assert history[2]["attempts"] == 2 and sorted(history[2]["accepted"]) == ["bank-a", "bank-b"]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
