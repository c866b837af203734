"""Privacy audit on a real deployment: every byte three agents send, captured and searched.

tests/test_privacy_audit.py audits what an organization's ClientApp replies, in-process. This
test audits the wire of a real deployment, every process started here on 127.0.0.1:

* `silotune coordinator` with TLS and node authentication (its SuperLink on loopback behind the
  gateway, server/gateway.py), the three organizations' keys enrolled, a 1-round tiny-llama job
  with **secure aggregation** on;
* three `silotune agent start` processes (clinic and bank: classification silos; law-firm: a Q&A
  silo; all three files written here, their text generated from a seed), each with its own key.
  bank runs an organization policy (`--policy`) whose `min_eval_examples` is above the job's
  `eval-max-examples`: each of its evaluate replies is an **error reply**
  (`policy_violation: min_eval_examples`), while it still trains and masks;
* between each agent and the gateway, a **recording proxy** of our own (``RecordingProxy``): each
  agent is given only its own proxy listener as the coordinator's address. The proxy terminates
  the agent's TLS with the coordinator's own certificate (the agent verifies it against ca.pem
  as it would the gateway's), writes every decrypted byte the agent sends to a file per
  connection (and every byte it receives to another), and relays them unchanged over a new TLS
  connection to the gateway (node-authentication signatures cover a timestamp only, so they pass
  through).

Why the capture is complete: an agent knows no other address of the coordinator, so everything it
sends to the coordinator passes the proxy; the recorded streams are parsed as HTTP/1.1 with
nothing left over (every byte is part of a request); every object the SuperLink asked an agent
for (``objects_to_push`` in the push-messages responses, recorded from the other direction) is
among the captured push-object requests, each one's content hashing to its object id; and every
reply the SuperNode's own log says it sent is among the captured push-messages requests.

The audit (tests/privacy_checks.py, the checker of tests/test_privacy_audit.py) then runs on

* each connection's whole byte stream (request lines, headers, protobuf bodies): no 20-byte
  window of any record's raw text or of any example as the trainer sees it, no 8 consecutive
  token ids as uint16/int32/int64/float32;
* every Flower message an agent pushed, rebuilt from the captured push-messages and push-object
  requests exactly as the SuperLink rebuilds it (``inflate_object_from_contents``), and every
  captured record object on its own: every metric a scalar, no numeric list or Array with 8
  consecutive numbers equal to a token-id window.

Negative controls: the captured bytes hold what an honest agent must send — each organization's
name, the masked input's record name, the job id, the error reply's reason — and the same checker
flags a copy of them with a record's text, a record's token ids or a per-example metric put in.
The run is checked to be real: the job finished, its provenance says secure aggregation, the
report's history holds bank's error reply, and every agent sent its masked input.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.proto.fleet_pb2 import PushMessagesResponse  # type: ignore[attr-defined]
from flwr.proto.message_pb2 import PushObjectRequest  # type: ignore[attr-defined]
from flwr.supercore.inflatable.inflatable_object import get_object_head_values_from_object_content
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES
from privacy_checks import (
    ID_WINDOW,
    Secrets,
    array_sequence,
    byte_leaks,
    content_leaks,
    id_window_leaks,
    non_scalar_metrics,
    record_sequences,
    silo_secrets,
)
from test_secure_deployment import survivors

from protos import codec
from protos.records import HEADER_RECORD, ORG_RECORD
from protos.secagg.wire import MASKED_RECORD, SECAGG_RECORD
from runtime.base_model import load_tokenizer
from runtime.flower_processes import alive, free_port, stop_process_tree
from runtime.keys import create_org_key
from server import pki

pytestmark = pytest.mark.slow

SILOTUNE = str(Path(sys.executable).with_name("silotune"))
ROWS = 40                 # records per silo
MAX_LENGTH = 96
EVAL_EXAMPLES = 4         # the job's eval-max-examples
REFUSING = "bank"         # its policy asks more held-out examples than the job: evaluate -> error reply
RULE = "min_eval_examples"
JOB_ID = "audit-deploy"
ORGS = ("clinic", "bank", "law-firm")
SETTINGS = {"model": "tiny-llama", "job-id": JOB_ID, "num-rounds": 1, "min-nodes": 3,
            "secure-aggregation": "true", "local-steps": 2, "batch-size": 4, "max-length": MAX_LENGTH,
            "eval-max-examples": EVAL_EXAMPLES, "learning-rate": 5e-3, "round-timeout": 240,
            "node-wait-timeout": 150}


# ---- silos whose text we control ------------------------------------------------------

def write_silos(folder: Path) -> dict[str, Path]:
    """Three silo files of generated records: every record distinct, with its own serial numbers."""
    rng = random.Random(20261122)
    names = ["Ilse Marquardt", "Tomasz Wierzbicki", "Aurelie Fontaine", "Kwame Mensah", "Rosalind Achterberg",
             "Yusuf Demirci", "Ottilie Brandvold", "Saoirse Ni Bhriain", "Matteo Zanardelli", "Hanne Kjaergaard"]
    symptoms = {"cardiology": ["palpitations on exertion", "crushing chest tightness", "ankle swelling at night"],
                "neurology": ["tingling in the left hand", "sudden double vision", "recurrent morning headaches"],
                "orthopedics": ["a swollen right knee", "lower back stiffness", "a painful shoulder after a fall"],
                "dermatology": ["an itchy rash on both forearms", "a changing mole on the neck", "scaly scalp patches"]}
    clinic = []
    for i in range(ROWS):
        label = list(symptoms)[i % 4]
        clinic.append({"text": f"Triage note CLN-{rng.randrange(10**6):06d}: {rng.choice(names)}, aged "
                               f"{rng.randrange(19, 90)}, reports {rng.choice(symptoms[label])} for "
                               f"{rng.randrange(2, 30)} days; blood pressure {rng.randrange(100, 170)}/"
                               f"{rng.randrange(60, 100)}, pulse {rng.randrange(50, 120)}; insurer policy "
                               f"{rng.randrange(10**8):08d}.", "label": label})
    merchants = {"fraud": ["card-not-present purchase at Zentrix Digital Goods", "cash withdrawal in Valletta at 03:12"],
                 "salary": ["monthly payroll from Hollbrook Engineering GmbH", "wages from Ostrava Logistics s.r.o."],
                 "rent": ["standing order to Vermeer Property Management", "rent for flat 4B, Calle Almirante 17"],
                 "chargeback": ["disputed charge from Fjordline Travel AS", "refund claim against Quillby Office Supply"]}
    bank = []
    for i in range(ROWS):
        label = list(merchants)[i % 4]
        bank.append({"text": f"Transaction TX{rng.randrange(10**9):09d} on account DE{rng.randrange(10**18):018d}: "
                             f"EUR {rng.randrange(10, 9000)}.{rng.randrange(100):02d}, "
                             f"{rng.choice(merchants[label])}, customer {rng.choice(names)}.", "label": label})
    clauses = ["retention of title", "liquidated damages for delay", "the defects liability period",
               "termination for convenience", "the price adjustment formula", "subcontracting without consent"]
    companies = ["Brennerhof Bau AG", "Castellvi Construcciones SL", "Nordvik Anlegg AS", "Pellegrini Edilizia SpA"]
    law = []
    for i in range(ROWS):
        clause, company = rng.choice(clauses), rng.choice(companies)
        law.append({"instruction": f"Matter M-{rng.randrange(10**5):05d}: may {company} rely on {clause} in "
                                   f"contract {rng.randrange(1000, 9999)}-{rng.choice('ABCDEFG')} after the site "
                                   f"handover on day {rng.randrange(1, 365)}?",
                    "response": f"Counsel's note {rng.randrange(10**6):06d}: {company} may rely on {clause} only "
                                f"if notice was served within {rng.randrange(5, 60)} days; the opposing party "
                                f"{rng.choice(companies)} disputes clause {rng.randrange(1, 40)}."})
    paths = {}
    for org, rows in (("clinic", clinic), ("bank", bank), ("law-firm", law)):
        paths[org] = folder / f"{org}.jsonl"
        paths[org].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


# ---- the recording proxy ---------------------------------------------------------------

class RecordingProxy:
    """Between each agent and the gateway: TLS in (the coordinator's certificate), TLS out.

    One listener on 127.0.0.1 per organization; connection N of `org` writes what the agent
    sent, decrypted, to ``folder/org/conn-NNNN.up`` and what it received to ``.down``, and
    relays both ways unchanged. Runs on its own event loop in a thread of the test process.
    """

    def __init__(self, folder: Path, upstream_port: int, server_tls: ssl.SSLContext,
                 upstream_tls: ssl.SSLContext) -> None:
        self.folder = folder
        self.upstream_port = upstream_port
        self.server_tls = server_tls
        self.upstream_tls = upstream_tls
        self.ports: dict[str, int] = {}
        self.errors: list[tuple[float, str]] = []   # (monotonic time, what)
        self._counter = itertools.count(1)
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="recording-proxy", daemon=True)
        self._thread.start()

    def listen(self, org: str) -> int:
        (self.folder / org).mkdir(parents=True, exist_ok=True)
        port = free_port()

        async def start() -> asyncio.AbstractServer:
            return await asyncio.start_server(lambda r, w: self._accept(org, r, w), "127.0.0.1", port,
                                              ssl=self.server_tls)
        self._servers.append(asyncio.run_coroutine_threadsafe(start(), self._loop).result(10))
        self.ports[org] = port
        return port

    async def _accept(self, org: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        base = self.folder / org / f"conn-{next(self._counter):04d}"
        up_file, down_file = open(f"{base}.up", "wb"), open(f"{base}.down", "wb")
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                up_reader, upstream = await asyncio.open_connection(
                    "127.0.0.1", self.upstream_port, ssl=self.upstream_tls, server_hostname="127.0.0.1")
            except OSError as err:
                # the gateway is gone (the job is over): what the agent sends still gets recorded
                self.errors.append((time.monotonic(), f"{base.name}: {err!r}"))
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError, ssl.SSLError):
                    while data := await asyncio.wait_for(reader.read(1 << 16), 2.0):
                        up_file.write(data)
                return

            async def agent_to_gateway() -> None:
                relaying = True
                while data := await reader.read(1 << 16):
                    up_file.write(data)        # recorded before it is relayed: nothing goes out unrecorded
                    if relaying:
                        try:
                            upstream.write(data)
                            await upstream.drain()
                        except (ConnectionError, ssl.SSLError, RuntimeError):
                            relaying = False   # the gateway went away: keep recording what the agent sends

            async def gateway_to_agent() -> None:
                while data := await up_reader.read(1 << 16):
                    down_file.write(data)
                    writer.write(data)
                    await writer.drain()

            sending = asyncio.ensure_future(agent_to_gateway())
            receiving = asyncio.ensure_future(gateway_to_agent())
            done, pending = await asyncio.wait({sending, receiving}, return_when=asyncio.FIRST_COMPLETED)
            if receiving in done and sending in pending:
                # the gateway closed: let what the agent already sent through, then close its side
                await asyncio.wait({sending}, timeout=1.0)
            for side in (sending, receiving):
                if not side.done():
                    side.cancel()
                elif not side.cancelled() and side.exception() is not None:
                    exc = side.exception()
                    if not isinstance(exc, (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                        self.errors.append((time.monotonic(), f"{base.name}: {exc!r}"))
        finally:
            up_file.close()
            down_file.close()
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    def stop(self) -> None:
        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()


# ---- reading the capture back ----------------------------------------------------------

@dataclass
class HttpMessage:
    start_line: str
    headers: dict[str, str]
    body: bytes


def parse_http(stream: bytes, *, responses: bool = False) -> tuple[list[HttpMessage], bytes]:
    """HTTP/1.1 messages one after the other (Content-Length or chunked bodies); and what is left."""
    out: list[HttpMessage] = []
    pos = 0
    while pos < len(stream):
        end = stream.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        lines = stream[pos:end].decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        body_at = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, cursor = bytearray(), body_at
            while True:
                line_end = stream.find(b"\r\n", cursor)
                if line_end < 0:
                    return out, stream[pos:]
                size = int(stream[cursor:line_end].split(b";")[0], 16)
                cursor = line_end + 2
                if size == 0:
                    trailer_end = stream.find(b"\r\n", cursor)
                    while trailer_end > cursor:          # trailer fields, up to an empty line
                        cursor = trailer_end + 2
                        trailer_end = stream.find(b"\r\n", cursor)
                    if trailer_end < 0:
                        return out, stream[pos:]
                    cursor = trailer_end + 2
                    break
                if cursor + size + 2 > len(stream):
                    return out, stream[pos:]
                body += stream[cursor:cursor + size]
                cursor += size + 2
            out.append(HttpMessage(lines[0], headers, bytes(body)))
            pos = cursor
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if body_at + length > len(stream):
                return out, stream[pos:]
            out.append(HttpMessage(lines[0], headers, stream[body_at:body_at + length]))
            pos = body_at + length
        elif responses and not re.match(r"HTTP/1\.[01] (1\d\d|204|304)", lines[0]):
            out.append(HttpMessage(lines[0], headers, stream[body_at:]))   # a body up to the close
            pos = len(stream)
        else:
            out.append(HttpMessage(lines[0], headers, b""))
            pos = body_at
    return out, stream[pos:]


@dataclass
class Pushed:
    """One reply message an agent pushed: the push-messages request's Message (metadata, error;
    its content goes as objects) and the object tree of its content."""

    org: str
    proto: Any
    tree: Any


@dataclass
class Capture:
    streams: dict[str, list[bytes]] = field(default_factory=dict)     # per org, per connection: agent -> coordinator
    leftovers: dict[str, list[bytes]] = field(default_factory=dict)   # bytes of a stream that are no request
    routes: dict[str, Counter] = field(default_factory=dict)
    bad_requests: list[str] = field(default_factory=list)
    objects: dict[str, dict[str, bytes]] = field(default_factory=dict)  # per org: object id -> content pushed
    asked: dict[str, set[str]] = field(default_factory=dict)          # per org: ids the SuperLink asked for
    pushed: list[Pushed] = field(default_factory=list)

    @property
    def all_bytes(self) -> dict[str, bytes]:
        return {org: b"".join(streams) for org, streams in self.streams.items()}

    def pool(self) -> dict[str, bytes]:
        return {oid: content for objects in self.objects.values() for oid, content in objects.items()}


def read_capture(folder: Path, orgs: tuple[str, ...]) -> Capture:
    capture = Capture()
    for org in orgs:
        capture.streams[org], capture.leftovers[org] = [], []
        capture.routes[org], capture.objects[org], capture.asked[org] = Counter(), {}, set()
        for up in sorted((folder / org).glob("conn-*.up")):
            stream = up.read_bytes()
            capture.streams[org].append(stream)
            requests, rest = parse_http(stream)
            capture.leftovers[org].append(rest)
            answers, _ = parse_http(up.with_suffix(".down").read_bytes(), responses=True)
            for i, request in enumerate(requests):
                method, path, _ = request.start_line.split(" ", 2)
                capture.routes[org][path] += 1
                kind = PROTOBUF_REQUEST_TYPES.get((method, path))
                where = f"{org}/{up.name} request {i} {method} {path}"
                if kind is None or request.headers.get("content-encoding"):
                    capture.bad_requests.append(f"{where}: not a Fleet API protobuf request")
                    continue
                body = kind.FromString(request.body)
                if path == "/v1/fleet/push-object":
                    if hashlib.sha256(body.object_content).hexdigest() != body.object_id:
                        capture.bad_requests.append(f"{where}: content does not hash to {body.object_id}")
                    capture.objects[org][body.object_id] = body.object_content
                elif path == "/v1/fleet/push-messages":
                    for proto, tree in zip(body.messages_list, body.message_object_trees, strict=True):
                        capture.pushed.append(Pushed(org, proto, tree))
                    if i < len(answers) and answers[i].start_line.split(" ")[1] == "200":
                        capture.asked[org] |= set(PushMessagesResponse.FromString(answers[i].body).objects_to_push)
    return capture


def rebuild(pushed: Pushed, pool: dict[str, bytes]) -> RecordDict | None:
    """The content of a pushed message, from the captured objects, as the SuperLink rebuilds it."""
    if not pushed.tree.children:     # an error reply carries no content
        return None
    (content_tree,) = pushed.tree.children
    content = inflate_object_from_contents(content_tree.object_id, pool, keep_object_contents=True)
    assert isinstance(content, RecordDict)
    return content


def object_leaks(oid: str, pool: dict[str, bytes], secrets: Secrets) -> list[str]:
    """The record checks on one captured object on its own: a ConfigRecord's or MetricRecord's
    numeric lists, a MetricRecord's non-scalar metrics, an Array's values."""
    kind, _, _ = get_object_head_values_from_object_content(pool[oid])
    if kind not in ("ConfigRecord", "MetricRecord", "Array"):
        return []
    obj = inflate_object_from_contents(oid, pool, keep_object_contents=True)
    where = f"{kind} {oid[:12]}"
    if kind == "Array":
        values = array_sequence(obj)
        return id_window_leaks(where, values, secrets) if values is not None else []
    found = [leak for name, seq in record_sequences(where, obj) for leak in id_window_leaks(name, seq, secrets)]
    return found + (non_scalar_metrics(where, obj) if kind == "MetricRecord" else [])


# ---- the deployment --------------------------------------------------------------------

@dataclass
class Deployment:
    root: Path
    capture: Capture
    secrets: Secrets
    report: dict[str, Any]
    provenance: dict[str, Any]
    logs: dict[str, str]
    proxy_errors: list[str]
    seconds: float


def read_flat(*paths: Path) -> str:
    return " ".join(" ".join(p.read_text(errors="replace").split()) for p in paths if p.exists())


def wait_for_text(path: Path, text: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if text in read_flat(path):
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path}:\n{path.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    started = time.monotonic()
    root = tmp_path_factory.mktemp("audit-deploy")
    silos = write_silos(root)
    pki_dir = root / "pki"
    pki.init_ca(pki_dir, days=2)
    pki.issue_server_cert(pki_dir, ["127.0.0.1"], days=1)
    tls = pki.coordinator_files(pki_dir, ["127.0.0.1"])
    keys = {org: create_org_key(root / f"{org}-keys", org) for org in ORGS}
    policy = root / "bank-policy.yaml"
    policy.write_text(f"{RULE}: {EVAL_EXAMPLES * 10}\n")   # more held-out examples than the job asks

    gateway_port = free_port()
    run_dir = root / "run"
    coordinator_cmd = [SILOTUNE, "coordinator", "--pki-dir", str(pki_dir), "--state-dir", str(root / "coord"),
                       "--port", str(gateway_port), "--timeout", "420", "--unsigned-app"]
    for org in ORGS:
        coordinator_cmd += ["--enroll", f"{org}={keys[org].public_key}"]
    for key, value in {**SETTINGS, "run-dir": str(run_dir)}.items():
        coordinator_cmd += ["--set", f"{key}={value}"]

    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tls.cert, tls.key)
    upstream_tls = ssl.create_default_context(cafile=str(tls.ca_cert))
    proxy = RecordingProxy(root / "capture", gateway_port, server_tls, upstream_tls)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_files = {name: root / f"{name}.log" for name in ("coordinator", *ORGS)}
    handles = {name: open(path, "w") for name, path in log_files.items()}
    processes: dict[str, subprocess.Popen] = {}
    leftovers: list[int] = []
    try:
        processes["coordinator"] = subprocess.Popen(coordinator_cmd, stdout=handles["coordinator"],
                                                    stderr=subprocess.STDOUT, env=env, cwd=root)
        wait_for_text(log_files["coordinator"], "(TLS, node auth)", 180, processes["coordinator"])
        for org in ORGS:
            cmd = [SILOTUNE, "agent", "start", "--no-resident", "--coordinator", f"127.0.0.1:{proxy.listen(org)}",
                   "--data", str(silos[org]), "--name", org, "--state-dir", str(root / org),
                   "--ca-cert", str(tls.ca_cert), "--private-key", str(keys[org].private_key), "--unsigned-apps"]
            if org == REFUSING:
                cmd += ["--policy", str(policy)]
            processes[org] = subprocess.Popen(cmd, stdout=handles[org], stderr=subprocess.STDOUT, env=env, cwd=root)
        code = processes["coordinator"].wait(timeout=480)
        assert code == 0, log_files["coordinator"].read_text()[-5000:]
        for org in ORGS:
            processes[org].send_signal(signal.SIGTERM)
        for org in ORGS:
            assert processes[org].wait(timeout=60) == 0, log_files[org].read_text()[-3000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                leftovers += stop_process_tree(process.pid, grace=5)
        for handle in handles.values():
            handle.close()
        proxy.stop()
    assert leftovers == [] and alive([p.pid for p in processes.values()]) == []

    assert survivors(root) == []
    # a connection the agents open once the coordinator has stopped its gateway cannot reach it: no error
    return collect(root, time.monotonic() - started,
                   [what for _, what in proxy.errors if "ConnectionRefused" not in what])


def collect(root: Path, seconds: float, proxy_errors: list[str]) -> Deployment:
    """What the tests look at, from the deployment's folder."""
    logs = {name: read_flat(root / f"{name}.log") for name in ("coordinator", *ORGS)}
    for org in ORGS:
        logs[f"{org}/supernode"] = read_flat(root / org / "supernode.log")
    return Deployment(
        root=root,
        capture=read_capture(root / "capture", ORGS),
        secrets=silo_secrets([root / f"{org}.jsonl" for org in ORGS], load_tokenizer("tiny-llama"), MAX_LENGTH),
        report=json.loads((root / "run" / "report.json").read_text()),
        provenance=json.loads((root / "run" / "specialist" / "provenance.json").read_text()),
        logs=logs,
        proxy_errors=proxy_errors,
        seconds=seconds,
    )


def replies(deployment: Deployment, org: str) -> list[tuple[Pushed, RecordDict | None]]:
    pool = deployment.capture.pool()
    return [(p, rebuild(p, pool)) for p in deployment.capture.pushed if p.org == org]


# ---- the tests -------------------------------------------------------------------------

def test_the_run_was_real(deployed: Deployment) -> None:
    report = deployed.report
    print(f"deployment: {deployed.seconds:.0f} s")
    # the report's per-organization table holds those that evaluated: not bank
    assert sorted(report["organizations"]) == sorted(set(ORGS) - {REFUSING})
    assert [h["round"] for h in report["history"]] == [0, 1]
    assert sorted(report["history"][1]["accepted"]) == sorted(ORGS), report["history"][1]
    assert deployed.provenance["secure_aggregation"] is True
    # bank's error replies reached the coordinator, with the rule and nothing else; the others evaluated
    for h in report["history"]:
        rejected = {r["org"]: r for r in h["eval_rejected"]}
        assert list(rejected) == [REFUSING], h
        assert rejected[REFUSING]["reason"] == "client_error" and f"policy_violation: {RULE}" in rejected[REFUSING]["detail"]
        assert sorted(h["eval"]) == sorted(set(ORGS) - {REFUSING}), h
    # why, in detail, stays in bank's own log
    assert f"policy rule {RULE} (eval-max-examples {EVAL_EXAMPLES} < {EVAL_EXAMPLES * 10})" in \
        deployed.logs[REFUSING] + deployed.logs[f"{REFUSING}/supernode"]
    # every agent sent its masked input, and evaluate replies (bank's: error replies)
    for org in ORGS:
        sent = replies(deployed, org)
        masked = [c for p, c in sent if c is not None and MASKED_RECORD in c.array_records]
        assert len(masked) == 1, org
        assert all(SECAGG_RECORD in c.config_records for p, c in sent
                   if c is not None and p.proto.metadata.message_type == "train")
        evaluations = [(p, c) for p, c in sent if p.proto.metadata.message_type == "evaluate"]
        assert len(evaluations) == 2, org      # rounds 0 and 1
        if org == REFUSING:
            assert all(c is None and p.proto.HasField("error") for p, c in evaluations)
            assert all(p.proto.error.reason == f"<class 'clients.policy.PolicyViolation'>:<'policy_violation: {RULE}'>"
                       for p, _ in evaluations)
        else:
            assert all(c is not None and c.metric_records["metrics"] for p, c in evaluations)


def test_the_capture_is_complete(deployed: Deployment) -> None:
    capture = deployed.capture
    assert deployed.proxy_errors == []
    assert capture.bad_requests == []
    for org in ORGS:
        assert capture.streams[org], f"{org} sent nothing through the proxy"
        # every byte of every stream is part of a parsed Fleet API request, but for a request the
        # agent was still writing when its connection ended (the gateway gone after the job)
        assert all(rest == b"" or rest.startswith(b"POST /v1/fleet/") for rest in capture.leftovers[org]), org
        assert set(capture.routes[org]) <= {path for _, path in PROTOBUF_REQUEST_TYPES if path.startswith("/v1/fleet/")}
        assert {"/v1/fleet/push-messages", "/v1/fleet/push-object", "/v1/fleet/pull-messages"} <= set(capture.routes[org])
        # every object the SuperLink asked this agent for was pushed through the proxy
        assert capture.asked[org] and capture.asked[org] <= set(capture.objects[org]), org
        # every reply the SuperNode says it sent went through the proxy
        sent_per_log = deployed.logs[f"{org}/supernode"].count("Sent successfully")
        pushed = [p for p in capture.pushed if p.org == org]
        assert sent_per_log == len(pushed) > 0, (org, sent_per_log, len(pushed))
        # and every pushed message rebuilds from what was captured
        for p, content in replies(deployed, org):
            assert content is not None or p.proto.HasField("error")
    print({org: dict(capture.routes[org]) for org in ORGS},
          {org: sum(map(len, capture.streams[org])) for org in ORGS})


def test_nothing_of_a_record_leaves_an_agent(deployed: Deployment) -> None:
    capture, secrets = deployed.capture, deployed.secrets
    found: dict[str, list[str]] = {}
    for org, streams in capture.streams.items():
        for i, stream in enumerate(streams):
            found[f"{org} connection {i + 1}"] = byte_leaks(stream, secrets)
    for org in ORGS:
        for j, (p, content) in enumerate(replies(deployed, org)):
            where = f"{org} reply {j} ({p.proto.metadata.message_type})"
            found[where] = content_leaks(content, secrets) if content is not None else []
            if p.proto.HasField("content") and p.proto.content.ByteSize():
                found[where].append("content inside the push-messages request itself")
        pool = capture.pool()
        for oid in capture.objects[org]:
            found[f"{org} object {oid[:12]}"] = object_leaks(oid, pool, secrets)
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    # every metric that left is a scalar (none at all from the refusing organization)
    metrics = {org: [dict(c.metric_records["metrics"]) for p, c in replies(deployed, org)
                     if c is not None and "metrics" in c.metric_records] for org in ORGS}
    assert metrics[REFUSING] == [] and all(metrics[org] for org in ORGS if org != REFUSING)
    # the masked input's header describes the round, not the data: no example count, no metrics
    for org in ORGS:
        headers = [codec.UpdateHeader.FromString(c.config_records[HEADER_RECORD]["bytes"])
                   for p, c in replies(deployed, org) if c is not None and HEADER_RECORD in c.config_records]
        assert len(headers) == 1 and headers[0].job_id == JOB_ID, org
        assert headers[0].num_examples == 0 and not headers[0].metrics, (org, headers[0])
    print("metrics that left:", metrics)


def test_the_checker_sees_the_capture(deployed: Deployment, tmp_path: Path) -> None:
    """Negative controls: what an honest agent must send is in the capture, and the same checker
    flags a copy of the capture into which a record's text, token ids or a per-example metric is put."""
    capture, secrets = deployed.capture, deployed.secrets
    sent = capture.all_bytes
    for org in ORGS:
        assert org.encode() in sent[org] and JOB_ID.encode() in sent[org]
        assert all(name.encode() in sent[org] for name in (MASKED_RECORD, SECAGG_RECORD, HEADER_RECORD, ORG_RECORD))
    assert f"policy_violation: {RULE}".encode() in sent[REFUSING]
    assert f"eval-max-examples {EVAL_EXAMPLES}".encode() not in sent[REFUSING]    # the detail stayed home
    assert all(b"policy_violation" not in sent[org] for org in ORGS if org != REFUSING)
    assert len(secrets.text) > 10_000 and len(secrets.id_tuples) > 2_000

    tokenizer = load_tokenizer("tiny-llama")
    record = json.loads((deployed.root / "law-firm.jsonl").read_text().splitlines()[7])
    ids = np.asarray(tokenizer(record["response"], add_special_tokens=False).input_ids)
    assert len(ids) >= ID_WINDOW + 4
    stream = max(capture.streams["law-firm"], key=len)
    middle = len(stream) // 2
    leaky_streams = {
        "25 bytes of a record's text": stream[:middle] + record["instruction"][10:35].encode() + stream[middle:],
        "token ids as uint16 at an odd offset": stream[:middle + 1] + ids[3:13].astype("<u2").tobytes() + stream[middle + 1:],
        "token ids as float32": stream[:middle] + ids[:9].astype("<f4").tobytes() + stream[middle:],
    }
    assert byte_leaks(stream, secrets) == []
    for what, leaky in leaky_streams.items():
        assert byte_leaks(leaky, secrets), f"the checker missed {what} in a captured stream"

    # a captured evaluate reply, with a record's token ids or a per-example metric put in
    (p, content) = next((p, c) for p, c in replies(deployed, "law-firm")
                        if c is not None and "metrics" in c.metric_records)
    assert content is not None and content_leaks(content, secrets) == []
    honest = {name: content[name] for name in content}
    cases = {
        "token ids in a MetricRecord list": RecordDict({**honest, "stats": MetricRecord({"seen": [int(i) for i in ids[:10]]})}),
        "a per-example metric": RecordDict({**honest, "metrics": MetricRecord({**dict(content.metric_records["metrics"]),
                                                                              "loss": [0.5, 0.25, 0.75, 1.0]})}),
        "token ids as an int64 Array": RecordDict({**honest, "extra": ArrayRecord(
            array_dict={"ids": Array(ids[2:14].astype("<i8"))}, keep_input=True)}),
        "token ids in a ConfigRecord list": RecordDict({**honest, "note": ConfigRecord({"ids": [int(i) for i in ids[1:11]]})}),
    }
    for what, leaky in cases.items():
        assert content_leaks(leaky, secrets), f"the checker missed {what}"

    # end to end: a forged push-object request in a copy of the captured stream goes through the
    # same parsing (HTTP, protobuf, object ids, inflation) and is flagged
    folder = tmp_path / "capture"
    shutil.copytree(deployed.root / "capture", folder)
    forged = {"ConfigRecord": ConfigRecord({"ids": [int(i) for i in ids[:10]], "why": record["response"][:30]}),
              "MetricRecord": MetricRecord({"per_example_loss": [0.5, 0.25, 0.75]})}
    target = max((folder / "law-firm").glob("conn-*.up"), key=lambda path: path.stat().st_size)
    with open(target, "ab") as out:
        for obj in forged.values():
            body = PushObjectRequest(run_id=1, object_id=obj.object_id, object_content=obj.deflate()).SerializeToString()
            out.write(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/protobuf"
                      b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    again = read_capture(folder, ORGS)
    assert again.bad_requests == [] and all(rest == b"" or rest.startswith(b"POST /v1/fleet/")
                                            for rest in again.leftovers["law-firm"])
    pool = again.pool()
    assert any("token ids" in leak for leak in object_leaks(forged["ConfigRecord"].object_id, pool, secrets))
    assert any("not a scalar" in leak for leak in object_leaks(forged["MetricRecord"].object_id, pool, secrets))
    assert any("record text" in leak for leak in byte_leaks(b"".join(again.streams["law-firm"]), secrets))
