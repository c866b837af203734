"""The Flower process layer: a real localhost SuperLink, SuperNodes and `flwr run`.

The end-to-end test writes a minimal Flower App into tmp_path (nothing
throwaway is committed), starts a SuperLink and two SuperNodes with
server.superlink / clients.supernode, submits the app with run-config values
that need quoting, waits for "finished:completed", checks that every node's
reply (and its node config) reached the ServerApp, then stops everything and
checks with psutil that no process of those trees survives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from flwr.common.config import parse_config_args

from clients.supernode import SuperNodeProcess
from runtime.flower_processes import (
    alive,
    find_local_superlink_pid,
    flower_env,
    flower_executable,
    free_port,
    new_tag,
    render_flwr_config,
    stop_process_tree,
    tagged,
)
from server.superlink import SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS, FlwrCliError, SuperLinkProcess

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "procprobe"
version = "1.0.0"
dependencies = ["flwr==1.41.0"]

[tool.flwr.app]
publisher = "silotune"

[tool.flwr.app.components]
serverapp = "procprobe.server_app:app"
clientapp = "procprobe.client_app:app"

[tool.flwr.app.config]
out-path = ""
num-nodes = 2
node-wait-timeout = 60.0
reply-timeout = 120.0
note = "default"
flag = false
"""

SERVER_APP = '''\
"""Push one train message per node, pull the replies, write them to out-path."""
import json
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    deadline = time.monotonic() + float(cfg["node-wait-timeout"])
    nodes = list(grid.get_node_ids())
    while len(nodes) < int(cfg["num-nodes"]) and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    content = RecordDict({"config": ConfigRecord({"note": str(cfg["note"])})})
    msgs = [Message(content, dst_node_id=n, message_type="train", group_id="1")
            for n in nodes]
    pending = set(grid.push_messages(msgs))
    replies = {}
    deadline = time.monotonic() + float(cfg["reply-timeout"])
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            node = str(reply.metadata.src_node_id)
            if reply.has_error():
                replies[node] = {"error": reply.error.reason}
            else:
                replies[node] = {"metrics": dict(reply.content["metrics"]),
                                 "echo": dict(reply.content["echo"])}
        time.sleep(0.2)
    with open(str(cfg["out-path"]), "w", encoding="utf-8") as fh:
        json.dump({"nodes": [str(n) for n in nodes], "replies": replies,
                   "run_config": dict(cfg)}, fh)
'''

CLIENT_APP = '''\
"""Reply to train with a MetricRecord and an echo of node config and message."""
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    note = str(msg.content["config"]["note"])
    node_config = context.node_config  # simulation nodes have no idx/silo-path
    metrics = MetricRecord({"idx": int(node_config.get("idx", -1)), "ok": 1.0})
    echo = ConfigRecord({"silo-path": str(node_config.get("silo-path", "")),
                         "note": note})
    return Message(RecordDict({"metrics": metrics, "echo": echo}), reply_to=msg)
'''


def write_probe_app(root: Path) -> Path:
    """A minimal Flower App (ServerApp + ClientApp) under root/probe-app."""
    app = root / "probe-app"
    (app / "procprobe").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "procprobe" / "__init__.py").write_text('"""Probe app."""\n')
    (app / "procprobe" / "server_app.py").write_text(SERVER_APP)
    (app / "procprobe" / "client_app.py").write_text(CLIENT_APP)
    return app


def tree_pids(*roots: int) -> set[int]:
    """The roots and all their current descendants."""
    pids = set(roots)
    for pid in roots:
        try:
            pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return pids


# ------------------------------------------------------------ pure helpers
@pytest.mark.parametrize(
    "config",
    [
        {"silo-path": "/data/silo a.jsonl", "idx": 3, "lr": 0.0005, "flag": True},
        {"note": "it's", "win": "C:\\temp\\x", "quote": 'say "hi"', "neg": -2},
        {"tiny": 1e-12, "big": 10**20, "off": False, "empty": "", "uni": "käse"},
        {"nested": {"a": 1, "b": "x y"}},
    ],
)
def test_render_flwr_config_round_trips_through_flwr_parser(config):
    parsed = parse_config_args([render_flwr_config(config)])
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    assert parsed == flat
    assert all(type(parsed[k]) is type(v) for k, v in flat.items())


def test_render_flwr_config_refuses_what_flower_cannot_carry():
    with pytest.raises(ValueError):
        render_flwr_config({"x": "both ' and \""})
    with pytest.raises(TypeError):
        render_flwr_config({"x": [1, 2]})
    with pytest.raises(ValueError):
        render_flwr_config({"bad key": 1})


def test_stop_process_tree_kills_children_and_orphans(tmp_path):
    """A parent that ignores SIGTERM, a child, and a grandchild in a new session."""
    script = tmp_path / "tree.py"
    script.write_text(textwrap.dedent("""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
        time.sleep(600)
    """))
    tag = new_tag()
    proc = subprocess.Popen([sys.executable, str(script)],
                            env=flower_env(tmp_path, tag=tag))
    try:
        deadline = time.monotonic() + 20
        while len(tagged(tag)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = {p.pid for p in tagged(tag)}
        assert len(pids) == 3
        stopped = stop_process_tree(proc.pid, grace=1.0, tag=tag)
        proc.wait(timeout=5)
        assert pids <= set(stopped)
        assert alive(pids) == []
    finally:
        stop_process_tree(proc.pid, grace=0.5, tag=tag)


# --------------------------------------------------------------- deployment
def test_superlink_and_two_supernodes_run_an_app_end_to_end(tmp_path):
    app = write_probe_app(tmp_path)
    out = tmp_path / "out dir" / "replies.json"  # a space: needs quoting
    out.parent.mkdir()
    t0 = time.monotonic()
    link = SuperLinkProcess()
    nodes = [SuperNodeProcess() for _ in range(2)]
    all_pids: set[int] = set()
    try:
        link.start(tmp_path / "link")
        assert find_local_superlink_pid(link.port) == link.pid
        for i, node in enumerate(nodes):
            node.start(link.fleet_address,
                       {"idx": i, "silo-path": f"/silos/org {i}/it's.jsonl"},
                       tmp_path / f"node{i}")
        online = link.wait_for_nodes(2, timeout=90)
        assert len(online) == 2
        # the in-process Control API call a waiting coordinator polls sees the same nodes
        assert link.online_node_ids() == sorted(int(n["node-id"]) for n in online)
        # the SuperExec asks for runs to launch at silotune's pace, not Flower's every second
        (superexec,) = [p for p in psutil.Process(link.pid).children(recursive=True)
                        if "flower-superexec" in " ".join(p.cmdline())]
        expected = os.environ.get(SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL_SECONDS))   # an operator's own setting wins
        assert superexec.environ()[SUPEREXEC_POLL_ENV] == expected

        # An unknown run-config key is refused by the SuperLink.
        with pytest.raises(FlwrCliError):
            link.submit_run(app, {"no-such-key": 1})

        run_config = {"out-path": str(out), "note": 'C:\\x "quoted" note',
                      "flag": True, "node-wait-timeout": 30.0}
        run_id = link.submit_run(app, run_config)
        assert link.run_status(run_id) in {"pending", "starting", "running",
                                           "finished:completed"}
        status = link.wait_for_run(run_id, timeout=240, poll=0.5)
        assert status == "finished:completed", link.log_tail()
        assert "Successfully installed procprobe" in link.run_logs(run_id)

        result = json.loads(out.read_text())
        node_ids = {n["node-id"] for n in online}
        assert set(result["nodes"]) == node_ids
        assert set(result["replies"]) == node_ids
        replies = sorted(result["replies"].values(), key=lambda r: r["metrics"]["idx"])
        assert [r["metrics"]["idx"] for r in replies] == [0, 1]
        assert [r["echo"]["silo-path"] for r in replies] == [
            "/silos/org 0/it's.jsonl", "/silos/org 1/it's.jsonl"]
        assert all(r["echo"]["note"] == run_config["note"] for r in replies)
        assert result["run_config"]["flag"] is True
        print(f"startup + 1-round run: {time.monotonic() - t0:.1f}s")
    finally:
        all_pids = tree_pids(*(p.proc.pid for p in [link, *nodes] if p.proc))
        all_pids |= {p.pid for t in [link.tag, *(n.tag for n in nodes)] for p in tagged(t)}
        with ThreadPoolExecutor() as pool:  # SuperNodes take ~3 s each to stop
            stopped = list(pool.map(lambda n: n.stop(), nodes))
        link.stop()
    assert all(stopped)
    assert len(all_pids) >= 6  # superlink, 2 supernodes, and a superexec each
    assert alive(all_pids) == []
    assert not any(tagged(t) for t in [link.tag, *(n.tag for n in nodes)])


def test_supernode_against_dead_address_is_stoppable(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    node = SuperNodeProcess()
    try:
        node.start(dead, {"silo-path": "/nowhere.jsonl"}, tmp_path / "a", timeout=60)
        time.sleep(2)
        assert node.exited is None  # still retrying: it does not give up by itself
        pids = tree_pids(node.pid) | {p.pid for p in tagged(node.tag)}
    finally:
        t = time.monotonic()
        node.stop(grace=5)
    assert time.monotonic() - t < 20
    assert alive(pids) == []
    assert not tagged(node.tag)


def test_supernode_with_max_wait_time_exits_by_itself(tmp_path):
    node = SuperNodeProcess()
    try:
        node.start(f"127.0.0.1:{free_port()}", None, tmp_path / "b", max_wait_time=3)
        deadline = time.monotonic() + 60
        while node.exited is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert node.exited not in (None, 0)
    finally:
        node.stop(grace=5)  # also finds its orphaned flower-superexec by tag
    assert not tagged(node.tag)


def test_superlink_start_failure_reports_log_tail(tmp_path):
    link = SuperLinkProcess()
    with pytest.raises(RuntimeError, match="flower-superlink exited"):
        link.start(tmp_path / "bad", extra_args=["--log-rotation-backup-count", "0"])
    assert link.proc is None
    assert not tagged(link.tag)


# ------------------------------------------------------- local simulation
def test_local_simulation_superlink_on_free_ports_is_found_and_stopped(tmp_path):
    """`flwr run` with `address = ":local:"` leaves a SuperLink running; stop it by PID."""
    app = write_probe_app(tmp_path)
    out = tmp_path / "sim.json"
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = ":local:"\n')
    http_port, control_port = free_port(), free_port()
    tag = new_tag()
    env = flower_env(home, tag=tag, extra={
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
    })

    def flwr(*args: str) -> dict:
        res = subprocess.run([flower_executable("flwr"), *args, "--format", "json"],
                             env=env, capture_output=True, text=True, timeout=180,
                             check=True, cwd=tmp_path)
        return json.loads(res.stdout)

    pid = None
    try:
        # num-supernodes defaults to 2; the federation config sets it per run.
        submitted = flwr("run", str(app), "sim", "--federation-config", "num-supernodes=3",
                         "--run-config", render_flwr_config({"out-path": str(out),
                                                             "num-nodes": 3}))
        assert submitted["success"]
        pid = find_local_superlink_pid(http_port)
        assert pid is not None
        assert "--simulation" in psutil.Process(pid).cmdline()
        deadline = time.monotonic() + 240
        status = ""
        while time.monotonic() < deadline:
            status = flwr("ls", "sim", "--run-id", submitted["run-id"])["runs"][0]["status"]
            if status.startswith("finished"):
                break
            time.sleep(1)
        assert status == "finished:completed"
        result = json.loads(out.read_text())
        assert len(result["nodes"]) == 3
        assert all("metrics" in r for r in result["replies"].values())
    finally:
        pid = pid or find_local_superlink_pid(http_port)
        pids = stop_process_tree(pid, grace=10, tag=tag) if pid else []
    assert pid in pids
    assert alive(pids) == []
    assert not tagged(tag)
    assert find_local_superlink_pid(http_port) is None
