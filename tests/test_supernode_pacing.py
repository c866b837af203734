"""The SuperNode's pacing (clients/supernode.py): Flower 1.41's hard-coded 3 s idle wait and 0.5 s
reply checks turned into ours, only those, only where the installed Flower has them."""

from __future__ import annotations

import argparse
import inspect

import pytest

import flwr.supernode.start_client_internal as flower_loop
from clients import supernode
from clients.cli.agent import pacing
from clients.supernode import FlowerPacingUnsupported, PacedTime, SuperNodeProcess


def test_the_installed_flower_waits_where_we_pace_it() -> None:
    # a Flower upgrade that moves or changes these waits fails here (and the paced SuperNode refuses to start)
    assert sorted(supernode.flower_waits(inspect.getsource(flower_loop))) == [0.5, 0.5, 3]


def test_paced_time_changes_flowers_two_waits_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    paced = PacedTime(pull_interval=0.25, reply_wait=0.02)
    for seconds in (3, 0.5, 1.0, 0.2):
        paced.sleep(seconds)
    assert slept == [0.25, 0.02, 1.0, 0.2]
    assert paced.time is supernode.time.time and paced.monotonic is supernode.time.monotonic


def test_pacing_patches_only_flowers_supernode_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setattr(flower_loop, "time", time)  # restored after the test
    monkeypatch.setattr(flower_loop, "pull_objects", flower_loop.pull_objects)
    supernode.pace_flower_supernode(0.5, 0.05)
    assert isinstance(flower_loop.time, PacedTime) and flower_loop.time.waits == {3: 0.5, 0.5: 0.05}
    assert flower_loop.pull_objects.keywords == {"initial_backoff": supernode.OBJECT_BACKOFF,
                                                 "backoff_cap": supernode.OBJECT_BACKOFF_CAP}
    assert time.sleep is not flower_loop.time.sleep  # the time module itself is untouched


def test_pacing_refuses_a_flower_whose_waits_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setattr(flower_loop, "time", time)
    monkeypatch.setattr(inspect, "getsource", lambda module: "import time\ntime.sleep(2)\ntime.sleep(0.5)\n")
    with pytest.raises(FlowerPacingUnsupported, match=r"waits \[0.5, 2\] s, not the 3 s idle"):
        supernode.pace_flower_supernode(0.5, 0.05)
    assert flower_loop.time is time


@pytest.mark.parametrize("option", ["pull_interval", "reply_wait", "task_poll"])
def test_bad_intervals_are_refused_before_anything_starts(tmp_path, option: str) -> None:  # type: ignore[no-untyped-def]
    node = SuperNodeProcess()
    with pytest.raises(ValueError, match=f"{option} must be in \\(0, 60\\] seconds, got 0"):
        node.start("127.0.0.1:1", None, tmp_path, **{option: 0})
    assert node.proc is None and node.launcher is None and not (tmp_path / "superexec.secret").exists()


def test_the_entry_point_checks_its_options() -> None:
    for bad in (["--pull-interval", "0", "--"], ["--reply-wait", "-1", "--", "--insecure"]):
        with pytest.raises(SystemExit):
            supernode.main(bad)


def test_agent_cli_pacing_options() -> None:
    def args(**kw: object) -> argparse.Namespace:
        return argparse.Namespace(**{"flower_pacing": False, "pull_interval": None, **kw})

    assert pacing(args()) == {}  # SuperNodeProcess's default
    assert pacing(args(pull_interval=0.2)) == {"pull_interval": 0.2}
    assert pacing(args(flower_pacing=True)) == {"pull_interval": None}  # Flower's flower-supernode as is
    with pytest.raises(ValueError, match="drop --pull-interval"):
        pacing(args(flower_pacing=True, pull_interval=1.0))
    with pytest.raises(ValueError, match="--pull-interval must be in"):
        pacing(args(pull_interval=0.0))
