"""Deployment overhead per organization-round on localhost (issue 14 item 6).

    python benchmarks/deployment.py                       # both modes, prints the table
    python benchmarks/deployment.py --results benchmarks/RESULTS.md --date 2026-11-25

Starts `silotune coordinator --insecure` (one job) and 3 `silotune agent start --insecure`
processes on 127.0.0.1, as tests/test_deployment.py's `deploy()` does, with the tiny
model; once with `--no-resident` agents (every message's ClientApp process loads the
model) and once with the resident trainer (each agent its own local Ray and actor).

Per organization-round (a train reply the coordinator accepted):
* push → reply: the job's events.jsonl, `round_started` to that organization's `reply`;
* training: `train_adapter`'s own time in the organization's process (the
  `train_seconds` each reply reports; the coordinator does not record it per
  organization, so a probe reads it there), and a bare baseline: `train_adapter`
  in this process on the same silos, same steps, median;
* where the rest goes: a probe (a `sitecustomize` on the agents' PYTHONPATH, this
  benchmark only) writes wall-clock stamps of each ClientApp process's fork,
  interpreter start, task pull, handler, model load, codec and reply push to a file
  per agent. Every stamp is `time.time()` on this one machine, as are the events'.
  A task handled by a warm runner (clients/app_launcher.py; the resident mode)
  runs in a process started before the round: its delivery ends when the runner
  starts pulling the task, and it has no interpreter start.

The agents run the code on their PYTHONPATH first: `PYTHONPATH=/path/to/other/checkout`
measures another version of silotune with this benchmark (e.g. before and after a change).

`--trace` puts the probe in the coordinator's processes too (its SuperLink, gateway and
ServerApp) and splits each organization-round's message path at every hop (TRACE_LEGS):
the ServerApp's Grid push (message, then its objects), the SuperNode's pull and its object
pulls, the warm runner, the reply's way back through the SuperNode's push and its objects,
the Grid's pull, and counts the object requests the SuperLink served (OBJECT_REQUESTS). One
experiment, benchmark only, through the same probe in every process: `--object-workers N`
(threads per object transfer).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_deployment import deploy as deploy_processes, write_silo  # noqa: E402

SETTINGS = {"model": "tiny-llama", "num-rounds": 3, "local-steps": 2, "max-length": 64,
            "eval-max-examples": 8, "min-nodes": 3, "round-timeout": 300, "node-wait-timeout": 300}
ORGS = ("org-0", "org-1", "org-2")
PROBE_ENV = "SILOTUNE_BENCH_PROBE"
WORKERS_ENV = "SILOTUNE_BENCH_OBJECT_WORKERS"  # the experiment (main's --object-workers)

# The probe: imported by every Python process of an agent (SuperNode, app launcher, ClientApp
# tasks, Ray workers); active only where PROBE_ENV is set. It wraps functions as their modules
# finish executing, so the code under test is unchanged.
PROBE = r'''
import importlib.abc, json, os, sys, time

_FILE = os.environ.get("SILOTUNE_BENCH_PROBE")


def _write(**record):
    record["pid"] = os.getpid()
    with open(_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _created():
    """This process's fork time, wall clock (start time in clock ticks since boot)."""
    with open("/proc/self/stat") as handle:
        ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")


def _timed(what, fn, extra=None, keep=None):
    def wrapper(*args, **kwargs):
        t0 = time.time()
        result = fn(*args, **kwargs)
        t1 = time.time()
        given = args + tuple(kwargs.values())  # Flower's routers call some handlers by keyword
        try:
            if keep is None or keep(given, result):  # keep: leave out idle polls that found nothing
                _write(what=what, t0=t0, t1=t1, **(extra(given, result) if extra else {}))
        except Exception as err:  # the probe never changes what the code under test does
            _write(what="probe_error", at=what, error=repr(err), t0=t0, t1=t1)
        return result
    wrapper.__wrapped__ = fn
    return wrapper


def _round_of(content):
    for record in content.config_records.values():
        if "server_round" in record:
            return int(record["server_round"])
    return None


def _patch_run_clientapp(m):
    m.pull_task_input = _timed("pulled", m.pull_task_input, lambda a, r: {
        "kind": r[0].metadata.message_type, "round": _round_of(r[0].content)})
    m.push_message = _timed("push", m.push_message)
    m.pull_and_inflate_object_from_tree = _timed("objects", m.pull_and_inflate_object_from_tree)


def _patch_supernode_loop(m):
    m.pull_objects = _timed("sn_objects", m.pull_objects)
    # the trace's legs (--trace): a pull that found a message, the reply wait + push to the SuperLink
    m._pull_and_store_message = _timed("sn_pulled", m._pull_and_store_message, keep=lambda a, r: r is not None)
    m._push_messages = _timed("sn_push", m._push_messages)
    m.push_object_contents_from_iterable = _timed("sn_push_objects", m.push_object_contents_from_iterable)


def _node(a, r):  # a: the handler's (request, ...), its request from a SuperNode
    return {"node": a[0].node.node_id}


def _patch_fleet_handlers(m):  # the SuperLink's Fleet API (--trace: the coordinator's processes)
    m.pull_messages = _timed("fleet_pull", m.pull_messages, _node, keep=lambda a, r: len(r.messages_list) > 0)
    m.push_messages = _timed("fleet_push", m.push_messages, _node)
    m.pull_object = _timed("fleet_pull_object", m.pull_object, _node)
    m.push_object = _timed("fleet_push_object", m.push_object, _node)


def _patch_serverappio_handlers(m):  # the SuperLink's side of the ServerApp's Grid
    m.push_messages = _timed("link_push", m.push_messages)
    m.pull_messages = _timed("link_pull", m.pull_messages, keep=lambda a, r: len(r.messages_list) > 0)
    m.push_object = _timed("link_push_object", m.push_object)
    m.pull_object = _timed("link_pull_object", m.pull_object)


def _patch_http_grid(m):  # the ServerApp's Grid
    m.HttpGrid.push_messages = _timed("grid_push", m.HttpGrid.push_messages)
    m.HttpGrid.pull_messages = _timed("grid_pull", m.HttpGrid.pull_messages,
                                      lambda a, r: {"nodes": [msg.metadata.src_node_id for msg in r]},
                                      keep=lambda a, r: len(r) > 0)
    m.push_objects = _timed("grid_push_objects", m.push_objects)
    m.pull_objects = _timed("grid_pull_objects", m.pull_objects)


def _patch_round_work(m):
    for kind in list(m.HANDLERS):
        m.HANDLERS[kind] = _timed("handler", m.HANDLERS[kind], lambda a, r, kind=kind: {
            "kind": kind, "round": _round_of(a[0])})


def _patch_trainer(m):
    m.train_adapter = _timed("train_adapter", m.train_adapter, lambda a, r: {"train_seconds": r[1]["train_seconds"]})


def _patch_resident(m):
    m.get_resident = _timed("get_resident", m.get_resident)


def _patch_codec(m):
    m.encode = _timed("encode", m.encode)
    m.decode = _timed("decode", m.decode)


def _patch_resident_trainer(m):
    m.run_on_resident_trainer = _timed("resident_call", m.run_on_resident_trainer)


def _patch_inflatable_utils(m):  # experiment: object transfers with more threads than cores
    workers = int(os.environ.get("SILOTUNE_BENCH_OBJECT_WORKERS") or 0)  # WORKERS_ENV
    if workers:
        m.get_num_workers = lambda max_concurrent: workers


PATCHES = {"flwr.supernode.runtime.run_clientapp": _patch_run_clientapp, "clients.round_work": _patch_round_work,
           "clients.trainer": _patch_trainer, "clients.resident": _patch_resident, "protos.codec": _patch_codec,
           "clients.resident_trainer": _patch_resident_trainer,
           "flwr.supernode.start_client_internal": _patch_supernode_loop,
           "flwr.superlink.servicer.fleet.fleet_handlers": _patch_fleet_handlers,
           "flwr.superlink.servicer.runtime.runtime_handlers": _patch_serverappio_handlers,
           "flwr.superlink.grid.http_grid": _patch_http_grid,
           "flwr.supercore.inflatable.inflatable_utils": _patch_inflatable_utils}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, patch):
        self.inner, self.patch = inner, patch

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _Loader(spec.loader, PATCHES[name])
                return spec
        return None


if _FILE:
    _write(what="process", created=_created(), started=time.time(), argv=" ".join(sys.argv[:4])[-200:])
    sys.meta_path.insert(0, _Finder())
'''


def deploy(root: Path, silos: list[Path], resident: bool, probe_dir: Path) -> Path:
    """tests/test_deployment.py's `deploy()` with the agents' mode chosen and the probe on their
    PYTHONPATH. Returns the run dir."""
    def probe_env(name: str) -> dict[str, str]:
        return {PROBE_ENV: str(root / f"probe-{name}.jsonl"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(probe_dir), os.environ.get("PYTHONPATH")]))}

    settings = {**SETTINGS, "job-id": f"overhead-{'resident' if resident else 'no-resident'}"}
    return deploy_processes(root, settings, silos, agent_args=() if resident else ("--no-resident",),
                            agent_env=probe_env, timeout=1200)


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def job_wall(root: Path, run_dir: Path) -> float:
    """Seconds from the first agent process's start to the job's last event."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    first = min(json.loads(line)["created"] for org in ORGS
                for line in (root / f"probe-{org}.jsonl").read_text().splitlines() if '"process"' in line)
    return _epoch(events[-1]["time"]) - first


def org_rounds(root: Path, run_dir: Path, resident: bool) -> list[dict[str, float]]:
    """One row per accepted train reply: push → reply and its parts, seconds."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    started = {e["round"]: _epoch(e["time"]) for e in events if e["event"] == "round_started"}
    rows = []
    for e in events:
        if e["event"] != "reply" or not e["accepted"]:
            continue
        probe = [json.loads(line) for line in (root / f"probe-{e['org']}.jsonl").read_text().splitlines()]
        row = {"round": e["round"], "push_reply": _epoch(e["time"]) - started[e["round"]]}
        row.update(_parts(probe, e["round"], started[e["round"]], _epoch(e["time"]), resident))
        row["org"] = e["org"]
        rows.append(row)
    return rows


def _parts(probe: list[dict[str, Any]], server_round: int, push: float, reply: float, resident: bool) -> dict[str, float]:
    """The train task of `server_round` in one agent's probe: its ClientApp process (pulled the
    train message of that round) and the handler that ran it (that process, or the resident actor)."""
    pulled = next(r for r in probe if r["what"] == "pulled" and r["kind"] == "train" and r["round"] == server_round)
    task = pulled["pid"]
    proc = next(r for r in probe if r["what"] == "process" and r["pid"] == task)
    warm = proc["created"] < push  # a warm runner, started before this round: the task begins at its pull
    began = pulled["t0"] if warm else proc["started"]
    handler = next(r for r in probe if r["what"] == "handler" and r["kind"] == "train" and r["round"] == server_round)
    worker = handler["pid"]

    def within(what: str, pid: int) -> list[dict[str, Any]]:
        return [r for r in probe if r["what"] == what and r["pid"] == pid
                and handler["t0"] - 1e-3 <= r["t0"] <= handler["t1"] + 1e-3]

    pushed = next(r for r in probe if r["what"] == "push" and r["pid"] == task and r["t0"] >= handler["t1"] - 1e-3)
    training = sum(r["t1"] - r["t0"] for r in within("train_adapter", worker))
    model = sum(r["t1"] - r["t0"] for r in within("get_resident", worker))
    codec = sum(r["t1"] - r["t0"] for r in within("encode", worker) + within("decode", worker))
    parts = {
        "delivery": (pulled["t0"] if warm else proc["created"]) - push,  # SuperLink → SuperNode → launcher → task
        "interpreter": 0.0 if warm else proc["started"] - proc["created"],  # fork → site imported
        "pull": pulled["t1"] - began,                         # (imports,) Runtime API pull of the message
        "to_handler": handler["t0"] - pulled["t1"],           # FAB install, app import (+ Ray hop if resident)
        "model_load": model,
        "codec": codec,
        "training": training,
        "handler_other": (handler["t1"] - handler["t0"]) - training - model - codec,  # silo, policy, checks
        "to_push": pushed["t0"] - handler["t1"],              # (resident: Ray back to the task)
        "push": pushed["t1"] - pushed["t0"],                  # reply to the SuperNode's Runtime API
        "return": reply - pushed["t1"],                       # SuperNode → SuperLink → coordinator poll, checks
    }
    objects = [r for r in probe if r["what"] == "objects" and r["pid"] == task
               and pulled["t0"] - 1e-3 <= r["t0"] <= pulled["t1"] + 1e-3]
    if objects:
        parts["objects"] = sum(r["t1"] - r["t0"] for r in objects)
    supernode = [r for r in probe if r["what"] == "sn_objects" and push <= r["t0"] <= pulled["t1"]]
    if supernode:
        parts["sn_objects"] = supernode[-1]["t1"] - supernode[-1]["t0"]
    if resident:
        call = max((r for r in probe if r["what"] == "resident_call" and r["pid"] == task
                    and pulled["t1"] - 1e-3 <= r["t0"] <= handler["t0"]), key=lambda r: r["t0"])
        parts["ray_call"] = (call["t1"] - call["t0"]) - (handler["t1"] - handler["t0"])
    return parts


TRACE_LEGS = [
    ("build", "round started → the ServerApp's Grid pushes (instructions built, global encoded)"),
    ("link_stored", "Grid PushMessages → stored in the SuperLink"),
    ("grid_objects", "…then the Grid pushes the messages' objects (all organizations)"),
    ("sn_pull", "stored → the SuperNode's pull returns it (its idle pull interval)"),
    ("sn_objects", "SuperNode pulls the message's objects from the SuperLink"),
    ("runner_task", "SuperNode has the message → runner has the task and its objects"),
    ("handler", "runner has the task → handler done (training and its codec)"),
    ("reply_push", "handler done → reply pushed to the SuperNode's Runtime API"),
    ("sn_reply", "reply at the SuperNode → the SuperNode's PushMessages stored in the SuperLink"),
    ("sn_reply_objects", "…then the SuperNode pushes the reply's objects"),
    ("grid_wait", "reply's objects in the SuperLink → the Grid's pull that returns it starts"),
    ("grid_pull", "the Grid's pull returning the reply (PullMessages + objects + confirm)"),
    ("grid_pull_objects", "…of which pulling the reply's objects"),
    ("on_reply", "pulled → the coordinator's reply event (decode, checks, accumulate)"),
]


def _node_ids(root: Path) -> dict[int, str]:
    """Flower node id → organization, from each SuperNode's log."""
    nodes = {}
    for org in ORGS:
        for log_file in (root / org).rglob("supernode.log"):
            for line in log_file.read_text(errors="replace").splitlines():
                if "SuperNode ID:" in line:
                    nodes[int(line.rsplit(":", 1)[1])] = org
    return nodes


def trace_legs(root: Path, run_dir: Path) -> list[dict[str, float]]:
    """--trace: per accepted train reply, the message path split at every hop (TRACE_LEGS, seconds)
    from the probes of the coordinator's processes (SuperLink, ServerApp) and of the agent's."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    started = {e["round"]: _epoch(e["time"]) for e in events if e["event"] == "round_started"}
    coord = [json.loads(line) for line in (root / "probe-coordinator.jsonl").read_text().splitlines()]
    org_node = {org: node for node, org in _node_ids(root).items()}

    def first(records: list[dict[str, Any]], what: str, after: float, **match: Any) -> dict[str, Any]:
        return min((r for r in records if r["what"] == what and r["t0"] >= after - 1e-3
                    and all(r.get(k) == v for k, v in match.items())), key=lambda r: r["t0"])

    rows = []
    for e in events:
        if e["event"] != "reply" or not e["accepted"]:
            continue
        push, reply, node = started[e["round"]], _epoch(e["time"]), org_node[e["org"]]
        probe = [json.loads(line) for line in (root / f"probe-{e['org']}.jsonl").read_text().splitlines()]
        grid = first(coord, "grid_push", push)
        stored = first(coord, "link_push", grid["t0"])
        fleet = first(coord, "fleet_pull", stored["t0"], node=node)
        sn = first(probe, "sn_pulled", fleet["t0"] - 0.5)   # its pull began before the message was stored
        sn_objects = first(probe, "sn_objects", sn["t0"])
        pulled = first(probe, "pulled", fleet["t0"])
        handler = first(probe, "handler", pulled["t0"])
        pushed = first(probe, "push", handler["t1"])
        reply_in = first(coord, "fleet_push", pushed["t0"], node=node)
        sn_push = max((r for r in probe if r["what"] == "sn_push" and r["t0"] <= reply_in["t0"]),
                      key=lambda r: r["t0"])
        sn_objects_up = first(probe, "sn_push_objects", reply_in["t0"])
        pull = min((r for r in coord if r["what"] == "grid_pull" and node in r["nodes"] and r["t0"] >= reply_in["t0"]),
                   key=lambda r: r["t0"])
        pull_objects = [r for r in coord if r["what"] == "grid_pull_objects" and pull["t0"] <= r["t0"] <= pull["t1"]]
        rows.append({
            "round": e["round"], "org": e["org"], "push_reply": reply - push,
            "build": grid["t0"] - push, "link_stored": stored["t1"] - grid["t0"],
            "grid_objects": grid["t1"] - stored["t1"], "sn_pull": fleet["t1"] - stored["t1"],
            "sn_objects": sn_objects["t1"] - sn_objects["t0"], "runner_task": pulled["t1"] - fleet["t1"],
            "handler": handler["t1"] - pulled["t1"], "reply_push": pushed["t1"] - handler["t1"],
            "sn_reply": reply_in["t1"] - pushed["t1"], "sn_reply_objects": sn_objects_up["t1"] - reply_in["t1"],
            "grid_wait": pull["t0"] - sn_objects_up["t1"], "grid_pull": pull["t1"] - pull["t0"],
            "grid_pull_objects": sum(r["t1"] - r["t0"] for r in pull_objects), "on_reply": reply - pull["t1"],
            "sn_push_total": sn_push["t1"] - sn_push["t0"],
        })
    return rows


#: the SuperLink's object handlers (probe stamps) and what they serve
OBJECT_REQUESTS = {"fleet_pull_object": "Fleet PullObject", "fleet_push_object": "Fleet PushObject",
                   "link_push_object": "ServerAppIo PushObject", "link_pull_object": "ServerAppIo PullObject"}


def object_requests(root: Path) -> dict[str, int]:
    """--trace: the object requests the coordinator's SuperLink handled over the whole job, by kind."""
    counts = dict.fromkeys(OBJECT_REQUESTS.values(), 0)
    for line in (root / "probe-coordinator.jsonl").read_text().splitlines():
        what = json.loads(line).get("what")
        if what in OBJECT_REQUESTS:
            counts[OBJECT_REQUESTS[what]] += 1
    counts["total"] = sum(counts.values())
    return counts


def trace_table(rows: list[dict[str, float]]) -> str:
    lines = ["| leg | median (s) | min | max |", "|---|---|---|---|"]
    for key, label in TRACE_LEGS + [("push_reply", "push → reply, whole")]:
        values = [r[key] for r in rows]
        lines.append(f"| {label} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    return "\n".join(lines)


def bare_training(silos: list[Path], repeats: int = 5) -> tuple[float, float, list[float]]:
    """(model load s, median train_adapter s, all times): in this process, the agents' silos,
    the same steps, torch's default threads (as a ClientApp process)."""
    from clients.formatting import encode_example
    from clients.resident import get_resident
    from clients.silo import classification_silo, split_silo
    from clients.trainer import TrainSettings, train_adapter
    from server.job_config import JobConfig

    cfg = JobConfig.from_run_config(SETTINGS)
    begun = time.perf_counter()
    resident = get_resident(cfg.model, cfg.lora)
    load = time.perf_counter() - begun
    start = resident.adapter()
    times = []
    for repeat in range(repeats):
        for i, path in enumerate(silos):
            rows = [(r["text"], r["label"]) for r in map(json.loads, path.read_text().splitlines())]
            train = split_silo(classification_silo(rows, source=path.name), cfg.test_fraction, cfg.seed)[0]
            examples = [encode_example(resident.tokenizer, e.prompt, e.answer, cfg.max_length) for e in train.examples]
            settings = TrainSettings(cfg.local_steps, cfg.batch_size, cfg.learning_rate, seed=repeat * 10 + i)
            t0 = time.perf_counter()
            train_adapter(resident, start, examples, settings)
            times.append(time.perf_counter() - t0)
    return load, statistics.median(times[2:]), times


def cold_import(repeats: int = 3) -> float:
    """Median wall time of a fresh `python -c "import clients.app"`: a lower bound on what
    a ClientApp process spends before it can run the app (torch, transformers, flwr)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import clients.app"], cwd=ROOT, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


PART_LABELS = [
    ("delivery", "push → task starts in its process (SuperNode pull + idle wait; launcher poll; fork if new)"),
    ("interpreter", "fork → interpreter up (0 in a warm runner)"),
    ("pull", "(imports +) task pulled from the SuperNode"),
    ("objects", "…of which the message's objects (waits while the SuperNode still stores them)"),
    ("sn_objects", "SuperNode pulling the message's objects from the SuperLink (overlaps the above)"),
    ("to_handler", "FAB install + app import (+ Ray hop when resident)"),
    ("ray_call", "…of which Ray: connect + call + return, outside the handler"),
    ("model_load", "model load (get_resident: imports peft/transformers, builds, fingerprints)"),
    ("codec", "codec decode + encode"),
    ("handler_other", "silo, policy, checks in the handler"),
    ("training", "train_adapter, in situ"),
    ("to_push", "handler end → reply push starts"),
    ("push", "reply pushed to the SuperNode"),
    ("return", "pushed → coordinator's reply event (SuperNode reply wait, coordinator poll-interval 0.2 s)"),
]


def report(modes: dict[str, list[dict[str, float]]], bare: float, load: float, cold: float, args: argparse.Namespace,
           wall: dict[str, float]) -> str:
    lines = [
        f"## Deployment overhead (issue 14) — {args.date}",
        "",
        f"Machine: {_cpu()}, {os.cpu_count()} cores, CPU only, shared with "
        f"other test runs (load average at start {args.load_start}, at end "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}). Localhost deployment: `silotune coordinator "
        f"--insecure` and 3 `silotune agent start --insecure`, model tiny-llama, 3 rounds, 2 local steps × batch 4, "
        f"max-length 64, eval-max-examples 8, min-nodes 3. Command: `{args.command}`.",
        "",
        "| mode | org-rounds | push→reply median / p90 (s) | training in situ median (s) | bare training median (s) "
        "| overhead median: − in situ / − bare (s) | target ≤ 1 s | agents start → job's last event (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, rows in modes.items():
        pr = [r["push_reply"] for r in rows]
        situ = [r["training"] for r in rows]
        over = [r["push_reply"] - r["training"] for r in rows]
        over_bare = statistics.median(pr) - bare
        lines.append(f"| {mode} | {len(rows)} | {statistics.median(pr):.2f} / {_q(pr, 0.9):.2f} | "
                     f"{statistics.median(situ):.3f} | {bare:.3f} | {statistics.median(over):.2f} / {over_bare:.2f} | "
                     f"{'met' if statistics.median(over) <= 1.0 else 'NOT met'} | {wall[mode]:.0f} |")
    lines += ["", "Where push→reply goes, median per organization-round (s; share of the median push→reply):", "",
              "| part | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for key, label in PART_LABELS:
        cells = []
        for rows in modes.values():
            values = [r[key] for r in rows if key in r]
            if not values:
                cells.append("—")
                continue
            median = statistics.median(values)
            cells.append(f"{median:.3f} ({median / statistics.median(r['push_reply'] for r in rows):.0%})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"- bare training: `train_adapter` in one process on the same three silos, same settings, "
        f"torch's default threads, median of {args.repeats * 3 - 2} calls after 2 warm-up: **{bare:.3f} s**; "
        f"tiny model load in that process (first get_resident, peft/transformers imports included): {load:.2f} s",
        f"- a fresh `python -c \"import clients.app\"` (the app and its imports: torch, flwr): **{cold:.2f} s** median of 3 "
        "(a lower bound on a ClientApp process's start)",
        f"- silotune on the agents' PYTHONPATH: {os.environ.get('PYTHONPATH') or '(the installed one)'}",
        "- polling, by the code: Flower 1.41's SuperNode pulls from the SuperLink and, when nothing is waiting, "
        "sleeps 3 s (`flwr/supernode/start_client_internal.py`); it then waits for the ClientApp's reply in 0.5 s "
        "sleeps before pushing it (both shortened by `clients/supernode.py` where that exists: 0.5 s and 0.05 s by "
        "default); our app launcher asks the SuperNode for tasks every `--poll-interval` (1.0 s before the warm "
        "runner, 0.1 s since); the coordinator polls replies every poll-interval = 0.2 s (`protos/job_settings.py`).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="no-resident,resident")
    parser.add_argument("--repeats", type=int, default=5, help="bare training passes over the 3 silos")
    parser.add_argument("--work-dir", default="", help="keep the deployments' files here (default: a temp dir)")
    parser.add_argument("--reuse", default="", help="modes whose deployment in --work-dir is read, not run again")
    parser.add_argument("--results", default="", help="append the section to this file (e.g. benchmarks/RESULTS.md)")
    parser.add_argument("--date", default=dt.date.today().isoformat())
    parser.add_argument("--trace", action="store_true",
                        help="probe the coordinator's processes too and split the message path at every hop")
    parser.add_argument("--object-workers", type=int, default=0,
                        help="experiment: threads per object transfer (Flower: min(2, cores))")
    args = parser.parse_args()
    args.command = "python " + " ".join(["benchmarks/deployment.py", *sys.argv[1:]])
    args.load_start = "/".join(f"{x:.1f}" for x in os.getloadavg())
    # the experiment reaches every process of the deployment through the probe (WORKERS_ENV)
    if args.object_workers:
        os.environ[WORKERS_ENV] = str(args.object_workers)

    from clients.silo.corpora import load_bbc_news

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="silotune-deploy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = load_bbc_news()
    silos = [write_silo(work / f"{name}.jsonl", corpus[40 * i: 40 * (i + 1)]) for i, name in enumerate(ORGS)]
    probe_dir = work / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PROBE)

    load, bare, _ = bare_training(silos, args.repeats)
    cold = cold_import()
    print(f"bare training median {bare:.3f} s, model load {load:.2f} s, cold import {cold:.2f} s", flush=True)
    modes, wall = {}, {}
    for mode in args.modes.split(","):
        root = work / mode
        saved = dict(os.environ)
        if args.trace:  # the coordinator and its SuperLink and ServerApp inherit this process's environment
            os.environ[PROBE_ENV] = str(root / "probe-coordinator.jsonl")
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(probe_dir), os.environ.get("PYTHONPATH")]))
        if mode in args.reuse.split(","):
            run_dir = root / "run"
        else:
            shutil.rmtree(root, ignore_errors=True)
            run_dir = deploy(root, silos, mode == "resident", probe_dir)
        wall[mode] = job_wall(root, run_dir)
        modes[mode] = org_rounds(root, run_dir, mode == "resident")
        for row in modes[mode]:
            print(mode, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if args.trace:
            os.environ.clear()
            os.environ.update(saved)
            legs = trace_legs(root, run_dir)
            for row in legs:
                print(mode, "trace", json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                 for k, v in row.items()}), flush=True)
            print(f"{mode}: the message path, per organization-round\n" + trace_table(legs), flush=True)
            print(f"{mode}: object requests served by the SuperLink, whole job: "
                  + json.dumps(object_requests(root)), flush=True)
    text = report(modes, bare, load, cold, args, wall)
    print(text)
    if args.results:
        with Path(args.results).open("a") as handle:
            handle.write("\n" + text)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
