"""The coordinator service, deployed (issue 13): one `silotune coordinator --serve` and three
agents that stay connected across jobs; an operator, with the CLI and an operator certificate,
trains two specialists on two different tasks (support-ticket classification, Q&A
instructions: each agent offers both files as named datasets), then continues one of them
into its version 2 and fetches it. Every process is started here and stopped by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from protos.silotune.v1 import jobs_pb2 as pb
from runtime.flower_processes import alive, free_port, stop_process_tree
from server import pki
from server.service.api import connect
from server.specialists import SpecialistRegistry

pytestmark = pytest.mark.slow

SILOTUNE = str(Path(sys.executable).with_name("silotune"))
SETTINGS = {"model": "tiny-llama", "num-rounds": 1, "local-steps": 1, "max-length": 64, "eval-max-examples": 4,
            "min-nodes": 3, "round-timeout": 240, "node-wait-timeout": 120}
LABELS = ["billing", "outage", "refund"]
TICKETS = {**SETTINGS, "dataset": "tickets", "task": "classification", "task-labels": ",".join(LABELS),
           "metric": "accuracy"}
FAQ = {**SETTINGS, "dataset": "faq", "task": "instruction", "metric": "perplexity"}


def write_silos(data: Path, org: str) -> tuple[Path, Path]:
    data.mkdir(parents=True, exist_ok=True)
    tickets = [{"text": f"{org} customer {i}: {label} problem number {i}", "label": label}
               for label in LABELS for i in range(6)]
    faq = [{"instruction": f"{org}: how long does permit {i} take?", "response": f"About {i + 2} weeks."}
           for i in range(16)]
    (data / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tickets))
    (data / "faq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in faq))
    return data / "tickets.jsonl", data / "faq.jsonl"


def sets(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def test_one_service_two_specialists_and_a_second_version(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir, days=2)
    pki.issue_server_cert(pki_dir, ["127.0.0.1"], days=1)
    operator = pki.issue_operator_cert(pki_dir, "ops", days=1)
    port, api_port, dashboard_port = free_port(), free_port(), free_port()
    state_dir = tmp_path / "coord"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SILOTUNE_API": f"127.0.0.1:{api_port}",
           "SILOTUNE_CA_CERT": str(operator.ca_cert), "SILOTUNE_OPERATOR_CERT": str(operator.cert),
           "SILOTUNE_OPERATOR_KEY": str(operator.key)}
    orgs = ["org-a", "org-b", "org-c"]
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("coordinator", *orgs)}
    processes: dict[str, subprocess.Popen] = {}

    def silotune(*args: str, timeout: float = 400) -> str:
        done = subprocess.run([SILOTUNE, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, (f"silotune {' '.join(args)}: {done.stdout[-3000:]}{done.stderr[-3000:]}\n"
                                      + (tmp_path / "coordinator.log").read_text()[-3000:])
        return done.stdout

    try:
        processes["coordinator"] = subprocess.Popen(
            [SILOTUNE, "coordinator", "--serve", "--insecure", "--pki-dir", str(pki_dir), "--state-dir",
             str(state_dir), "--port", str(port), "--api-port", str(api_port), "--dashboard-port", str(dashboard_port)],
            stdout=logs["coordinator"], stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        for org in orgs:
            tickets, faq = write_silos(tmp_path / "data" / org, org)
            processes[org] = subprocess.Popen(
                [SILOTUNE, "agent", "start", "--no-resident", "--insecure", "--coordinator", f"127.0.0.1:{port}",
                 "--data", f"tickets={tickets}", "--data", f"faq={faq}", "--name", org,
                 "--state-dir", str(tmp_path / org)],
                stdout=logs[org], stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        wait_for_api(env["SILOTUNE_API"], operator, processes["coordinator"], tmp_path / "coordinator.log")

        # two specialists, two tasks, one after the other on the same agents
        assert "job-0001 queued" in silotune("job", "submit", "--specialist", "tickets", *sets(TICKETS))
        assert "job-0002 queued" in silotune("job", "submit", "--specialist", "faq", *sets(FAQ))
        watched = silotune("job", "watch", "job-0001")
        assert "round 1 done" in watched and "job-0001 finished: specialist tickets:1" in watched, watched
        assert "job-0002 finished: specialist faq:1" in silotune("job", "watch", "job-0002")

        listed = silotune("specialist", "ls")
        assert "tickets:1" in listed and "faq:1" in listed, listed
        registry = SpecialistRegistry(state_dir)
        tickets_1, faq_1 = registry.get("tickets", 1), registry.get("faq", 1)
        assert tickets_1.metric == "accuracy" and faq_1.metric == "perplexity"
        for specialist in (tickets_1, faq_1):
            assert sorted(specialist.metrics["organizations"]) == orgs
            assert specialist.metrics["overall"]["specialist"]
        assert tickets_1.task_spec_fingerprint != faq_1.task_spec_fingerprint
        assert "org-a" in silotune("specialist", "show", "tickets")

        # continuing the first one makes its version 2, from version 1's adapter
        assert "continuing tickets:1" in silotune("job", "submit", "--continue", "tickets", *sets(TICKETS))
        assert "job-0003 finished: specialist tickets:2" in silotune("job", "watch", "job-0003")
        tickets_2 = registry.get("tickets", 2)
        assert tickets_2.parent == "tickets:1" and tickets_2.adapter_sha256 != tickets_1.adapter_sha256

        out = tmp_path / "fetched"
        silotune("specialist", "fetch", "tickets:2", "--out", str(out))
        fetched = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert fetched == {p.relative_to(tickets_2.path): p.read_bytes()
                           for p in tickets_2.path.rglob("*") if p.is_file()}
        jobs = silotune("job", "ls")
        assert jobs.count("│ finished │") == 3, jobs
        # the service's dashboard shows the same, to the operator's certificate only
        import ssl

        import httpx

        operator_tls = ssl.create_default_context(cafile=str(operator.ca_cert))
        operator_tls.load_cert_chain(str(operator.cert), str(operator.key))  # httpx's cert= is ignored
        with httpx.Client(verify=operator_tls) as browser:
            shown = browser.get(f"https://127.0.0.1:{dashboard_port}/api/jobs").json()["jobs"]
            assert sorted((j["id"], j["state"]) for j in shown) == [
                ("job-0001", "finished"), ("job-0002", "finished"), ("job-0003", "finished")]
            assert all(j["bytes"] for j in shown), shown   # bytes moved, counted per round
        with pytest.raises(httpx.HTTPError):   # no operator certificate: the handshake fails
            httpx.get(f"https://127.0.0.1:{dashboard_port}/api/jobs", verify=str(operator.ca_cert))

        # SIGTERM: the service stops its API, manager, gateway and SuperLink and exits cleanly
        processes["coordinator"].send_signal(signal.SIGTERM)
        assert processes["coordinator"].wait(timeout=60) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
        for org in orgs:
            processes[org].send_signal(signal.SIGTERM)
            assert processes[org].wait(timeout=60) == 0, (tmp_path / f"{org}.log").read_text()[-3000:]
    finally:
        leftovers = []
        for process in processes.values():
            if process.poll() is None:
                leftovers += stop_process_tree(process.pid, grace=5)
        for handle in logs.values():
            handle.close()
    assert leftovers == [] and alive([p.pid for p in processes.values()]) == []


def wait_for_api(address: str, operator: pki.OperatorFiles, coordinator: subprocess.Popen, log: Path,
                 timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert coordinator.poll() is None, log.read_text()[-3000:]
        try:
            with connect(address, operator.ca_cert, operator.cert, operator.key) as jobs:
                jobs.List(pb.ListRequest(), timeout=5)
            return
        except grpc.RpcError:
            time.sleep(0.5)
    raise AssertionError(f"no jobs API at {address} after {timeout}s:\n{log.read_text()[-3000:]}")
