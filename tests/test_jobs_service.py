"""The coordinator service (issue 13): the job store, the job manager and the jobs API.

No Flower process here: the manager drives a fake SuperLink whose "run" writes what a real
job writes (round events, ``specialist/`` exported by server/export.py, ``report.json``).
The jobs API is the real gRPC server over real mutual TLS on 127.0.0.1, with a PKI made by
server/pki.py; tests/test_service_deployment.py runs the whole thing with agents.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protos.adapter import LoraSpec, adapter_layout, init_adapter
from protos.silotune.v1 import jobs_pb2 as pb
from runtime import keys
from server import pki
from server.checkpoint import CheckpointStore
from server.events import EVENTS_FILE, EventsFile
from server.export import export_specialist
from server.service.api import JobsApi, connect, decode_run_config, encode_run_config
from server.service.manager import JobManager, SubmitError, Submission
from server.service.store import (
    CANCELLED, FAILED, FINISHED, QUEUED, RUNNING, JobStateError, JobStore, job_run_dir,
)
from server.specialists import SpecialistRegistry, init_adapter_provenance
from test_control_plane import make_pki
from test_control_plane import self_signed_operator as self_signed

TASK = {"model": "tiny-llama", "num-rounds": 1, "local-steps": 1, "max-length": 64, "min-nodes": 3}


# ------------------------------------------------------------------ a job's outputs, made for real
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny specialist folder, as server/export.py writes it at the end of a job."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("exported")
    spec = LoraSpec(rank=4, alpha=8)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)
    adapter = init_adapter(adapter_layout(config, spec), seed=1)
    rng = np.random.default_rng(3)
    for name, arr in adapter.items():
        if ".lora_B." in name:
            adapter[name] = rng.normal(0.0, 0.2, size=arr.shape).astype(np.float32)
    store = CheckpointStore(root / "ckpt")
    store.save(1, adapter, spec, "tiny-llama", {"round": 1}, {})
    return export_specialist(store.latest(), root / "specialist",
                             {"job_id": "x", "organizations": ["org-a", "org-b", "org-c"]})


def report(metric_value: float) -> dict:
    orgs = {org: {"base": {"accuracy": 0.2}, "specialist": {"accuracy": metric_value}}
            for org in ("org-a", "org-b", "org-c")}
    return {"job_id": "x", "model": "tiny-llama", "metric": "accuracy", "rounds": 1, "organizations": orgs,
            "overall": {"base": {"accuracy": 0.2}, "specialist": {"accuracy": metric_value}}, "history": []}


class FakeSuperLink:
    """submit_run / run_status / stop_run / run_logs of server.superlink.SuperLinkProcess; each run
    writes events, then (once ``release`` is set) the specialist and the report, and completes."""

    def __init__(self, exported: Path, *, hold: bool = False, outcome: str = "finished:completed") -> None:
        self.exported = exported
        self.outcome = outcome
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.runs: dict[int, dict] = {}
        self.stopped: list[int] = []
        self.lock = threading.Lock()

    def submit_run(self, app_dir: Path, run_config: dict) -> int:
        with self.lock:
            run_id = 100 + len(self.runs)
            self.runs[run_id] = {"status": "running", "config": dict(run_config)}
        threading.Thread(target=self._run, args=(run_id,), daemon=True).start()
        return run_id

    def _run(self, run_id: int) -> None:
        config = self.runs[run_id]["config"]
        run_dir = Path(config["run-dir"])
        events = EventsFile(run_dir / EVENTS_FILE, config["job-id"])
        events.round_finished(0, {"round": 0, "eval": {"org-a": {"accuracy": 0.2}}})
        events.round_started(1, 3)
        events.reply(1, "org-a", True, "n=4")
        self.release.wait(30)
        if self.runs[run_id]["status"] != "running":
            return
        events.round_finished(1, {"round": 1, "eval": {"org-a": {"accuracy": 0.6}}})
        if self.outcome == "finished:completed":
            shutil.copytree(self.exported, run_dir / "specialist", dirs_exist_ok=True)
            provenance = json.loads((run_dir / "specialist" / "provenance.json").read_text())
            provenance.update(init_adapter_provenance(config.get("init-adapter", "")))  # as server/app.py does
            (run_dir / "specialist" / "provenance.json").write_text(json.dumps(provenance))
            (run_dir / "report.json").write_text(json.dumps(report(0.6)))
        self.runs[run_id]["status"] = self.outcome

    def run_status(self, run_id: int) -> str:
        return self.runs[run_id]["status"]

    def stop_run(self, run_id: int) -> None:
        self.stopped.append(run_id)
        self.runs[run_id]["status"] = "finished:stopped"

    def run_logs(self, run_id: int) -> str:
        return f"log of run {run_id}\n"


def wait_until(condition, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def manager_for(state_dir: Path, superlink: FakeSuperLink) -> JobManager:
    return JobManager(state_dir, superlink, app_dir=state_dir, poll=0.05)


# ------------------------------------------------------------------ the store
def test_a_job_moves_queued_running_finished_and_nothing_moves_it_back(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = store.create("tickets", {"num-rounds": 1})
    assert (job.id, job.state, job.run_dir) == ("job-0001", QUEUED, str(job_run_dir(tmp_path, "job-0001")))
    assert store.create("tickets", {}).id == "job-0002"
    assert store.mark_running(job.id).started_at is not None
    assert store.set_run_id(job.id, 7).run_id == 7
    assert store.set_run_id(job.id, 2**64 - 5).run_id == 2**64 - 5   # Flower's run ids are uint64
    done = store.mark_finished(job.id, 1)
    assert (done.state, done.specialist_version) == (FINISHED, 1) and done.finished_at
    for move in (store.mark_cancelled, store.requeue, store.mark_running):
        with pytest.raises(JobStateError):
            move(job.id)
    assert [j.id for j in store.list((QUEUED,))] == ["job-0002"]
    # the schema the dashboard reads
    import sqlite3

    db = sqlite3.connect(tmp_path / "jobs.sqlite")
    columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
    assert columns == ["id", "specialist", "spec_json", "state", "run_id", "run_dir", "created_at", "started_at",
                       "finished_at", "specialist_version", "error", "continue_from"]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_cancelled_job_stays_cancelled_when_its_run_ends(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = store.create("tickets", {})
    store.mark_running(job.id)
    store.mark_cancelled(job.id)
    for end in (lambda: store.mark_finished(job.id, 1), lambda: store.mark_failed(job.id, "x")):
        with pytest.raises(JobStateError):
            end()
    assert store.get(job.id).state == CANCELLED


# ------------------------------------------------------------------ the manager
def test_a_job_runs_and_its_specialist_is_registered_then_continued_as_version_2(tmp_path: Path,
                                                                                  exported: Path) -> None:
    superlink = FakeSuperLink(exported)
    manager = manager_for(tmp_path, superlink).start()
    try:
        job = manager.submit(Submission("tickets", TASK))
        done = wait_until(lambda: (j := manager.store.get(job.id)).ended and j)
        assert (done.state, done.specialist_version, done.run_id) == (FINISHED, 1, 100), done.error
        config = superlink.runs[100]["config"]
        assert config["run-dir"] == str(tmp_path.resolve() / "jobs" / job.id / "run")
        assert config["job-id"] == f"tickets-{job.id}" and "init-adapter" not in config
        first = manager.registry.get("tickets", 1)
        assert first.job_id == job.id and first.metrics["overall"]["specialist"]["accuracy"] == 0.6

        again = manager.submit(Submission("", {**TASK, "num-rounds": 2}, continue_from="tickets"))
        assert (again.specialist, again.continue_from) == ("tickets", "tickets:1")
        done = wait_until(lambda: (j := manager.store.get(again.id)).ended and j)
        assert (done.state, done.specialist_version) == (FINISHED, 2), done.error
        assert superlink.runs[101]["config"]["init-adapter"] == str(first.path)
        assert manager.registry.get("tickets", 2).parent == "tickets:1"
    finally:
        manager.stop()


def test_a_bad_job_is_refused_at_submit_and_nothing_is_queued(tmp_path: Path, exported: Path) -> None:
    manager = manager_for(tmp_path, FakeSuperLink(exported))
    refused = {
        "num-round": {"num-round": 3},                     # misspelt key
        "num-rounds=0": {"num-rounds": 0},
        "run-dir": {"run-dir": "/tmp/elsewhere"},           # the service's to set
        "init-adapter": {"init-adapter": "/tmp/x"},
    }
    for what, spec in refused.items():
        with pytest.raises(SubmitError):
            manager.submit(Submission("tickets", spec))
    with pytest.raises(SubmitError, match="no specialist named"):
        manager.submit(Submission("tickets", TASK, continue_from="tickets"))
    with pytest.raises(SubmitError):
        manager.submit(Submission("Bad Name!", TASK))
    assert manager.store.list() == []


def test_cancel_a_queued_job_and_a_running_one(tmp_path: Path, exported: Path) -> None:
    superlink = FakeSuperLink(exported, hold=True)
    manager = manager_for(tmp_path, superlink).start()
    try:
        running = manager.submit(Submission("tickets", TASK))
        queued = manager.submit(Submission("qa", TASK))
        wait_until(lambda: manager.store.get(running.id).run_id)
        assert manager.cancel(queued.id).state == CANCELLED
        assert manager.cancel(running.id).state == CANCELLED
        assert superlink.stopped == [100]
        time.sleep(0.3)
        assert len(superlink.runs) == 1   # the cancelled queued job never ran
        assert [j.state for j in manager.store.list()] == [CANCELLED, CANCELLED]
        assert manager.registry.list() == []
        with pytest.raises(JobStateError):
            manager.cancel(running.id)
    finally:
        manager.stop()


def test_a_failed_run_fails_its_job_and_the_next_one_runs(tmp_path: Path, exported: Path) -> None:
    superlink = FakeSuperLink(exported, outcome="finished:failed")
    manager = manager_for(tmp_path, superlink).start()
    try:
        first = manager.submit(Submission("tickets", TASK))
        second = manager.submit(Submission("qa", TASK))
        done = wait_until(lambda: (j := manager.store.get(second.id)).ended and j)
        failed = manager.store.get(first.id)
        assert failed.state == done.state == FAILED and "finished:failed" in (failed.error or "")
        assert (job_run_dir(tmp_path, first.id).parent / "run-100.log").read_text() == "log of run 100\n"
    finally:
        manager.stop()


def test_a_job_left_running_by_a_stopped_coordinator_resumes_first_in_the_same_run_dir(tmp_path: Path,
                                                                                          exported: Path) -> None:
    before = FakeSuperLink(exported, hold=True)
    manager = manager_for(tmp_path, before).start()
    job = manager.submit(Submission("tickets", TASK))
    wait_until(lambda: manager.store.get(job.id).run_id)
    later = manager.submit(Submission("qa", TASK))
    manager.stop()   # the coordinator stops mid-job: the job stays running
    assert manager.store.get(job.id).state == RUNNING and manager.store.get(later.id).state == QUEUED

    after = FakeSuperLink(exported)
    restarted = manager_for(tmp_path, after).start()
    try:
        wait_until(lambda: restarted.store.get(later.id).ended)
        resumed = restarted.store.get(job.id)
        assert resumed.state == FINISHED and resumed.specialist_version == 1
        assert after.runs[100]["config"]["run-dir"] == before.runs[100]["config"]["run-dir"]
        assert after.runs[100]["config"]["job-id"] == before.runs[100]["config"]["job-id"]
        assert restarted.registry.get("tickets", 1).job_id == job.id   # resumed before the queued job
        # events of both attempts are in the one file (a resumed job appends)
        events = (Path(resumed.run_dir) / EVENTS_FILE).read_text().splitlines()
        assert sum('"round_started"' in line for line in events) == 2
    finally:
        restarted.stop()


# ------------------------------------------------------------------ the API, over mutual TLS
def client_cert_not_operator(pki_dir: Path, out: Path) -> tuple[Path, Path]:
    """A client certificate the federation's CA signed, for something other than an operator
    (`silotune pki` issues none such: this is the check behind the handshake's)."""
    _, ca_cert, ca_key = pki._load_ca_pair(pki_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "organization"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "ops")])
    cert = pki._leaf_certificate(ca_cert, ca_key, key, subject, [x509.UniformResourceIdentifier("urn:x")],
                                 ExtendedKeyUsageOID.CLIENT_AUTH, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "client.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keys.write_private(out / "client.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return out / "client.pem", out / "client.key"


@pytest.fixture
def service(tmp_path: Path, exported: Path) -> Iterator[tuple[Path, JobsApi, FakeSuperLink]]:
    pki_dir = make_pki(tmp_path)
    superlink = FakeSuperLink(exported)
    manager = manager_for(tmp_path / "state", superlink).start()
    api = JobsApi(manager, pki.coordinator_files(pki_dir, ["127.0.0.1"]), "127.0.0.1", 0, poll=0.05).start()
    try:
        yield pki_dir, api, superlink
    finally:
        api.stop(0)
        manager.stop()


def as_operator(pki_dir: Path, api: JobsApi):  # type: ignore[no-untyped-def]
    return connect(api.address, pki_dir / "ca.pem", pki_dir / "operator-ops.pem", pki_dir / "operator-ops.key")


def test_an_operator_submits_lists_watches_and_fetches_the_specialist(service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pki_dir, api, _ = service
    with as_operator(pki_dir, api) as jobs:
        job = jobs.Submit(pb.SubmitRequest(specialist="tickets", run_config=encode_run_config(TASK)))
        assert job.state in (QUEUED, RUNNING) and job.id == "job-0001"
        events = list(jobs.Watch(pb.JobRef(id=job.id), timeout=30))   # until the job ends
        assert [e.event for e in events] == ["round_finished", "round_started", "reply", "round_finished"]
        assert events[2].org == "org-a" and events[2].accepted and events[1].sampled == 3
        assert json.loads(events[3].summary_json)["round"] == 1
        listed = jobs.List(pb.ListRequest()).jobs
        assert [(j.id, j.state, j.specialist_version) for j in listed] == [(job.id, FINISHED, 1)]
        assert decode_run_config(listed[0].run_config) == TASK

        registered = jobs.GetSpecialist(pb.SpecialistRef(name="tickets"))
        assert (registered.name, registered.version, registered.job_id) == ("tickets", 1, job.id)
        assert json.loads(registered.metrics_json)["overall"]["specialist"]["accuracy"] == 0.6
        assert [s.version for s in jobs.ListSpecialists(pb.ListSpecialistsRequest()).specialists] == [1]

        files: dict[str, bytes] = {}
        digests: dict[str, str] = {}
        for chunk in jobs.FetchSpecialist(pb.SpecialistRef(name="tickets", version=1)):
            files[chunk.path] = files.get(chunk.path, b"") + chunk.data
            if chunk.sha256:
                digests[chunk.path] = chunk.sha256
    folder = SpecialistRegistry(tmp_path / "state").get("tickets", 1).path
    on_disk = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert files == on_disk and "adapter_model.safetensors" in files
    assert digests == {path: hashlib.sha256(data).hexdigest() for path, data in on_disk.items()}


def test_the_api_refuses_bad_requests_by_name(service) -> None:  # type: ignore[no-untyped-def]
    pki_dir, api, _ = service
    with as_operator(pki_dir, api) as jobs:
        with pytest.raises(grpc.RpcError) as caught:
            jobs.Submit(pb.SubmitRequest(specialist="tickets", run_config={"num-round": "3"}))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num-round" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            jobs.Cancel(pb.JobRef(id="job-9999"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            jobs.GetSpecialist(pb.SpecialistRef(name="nobody"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert list(jobs.List(pb.ListRequest()).jobs) == []


def test_only_an_operator_certificate_of_the_federation_is_served(service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pki_dir, api, superlink = service
    org = keys.create_org_key(tmp_path / "keys", "bank-a")
    other = make_pki(tmp_path / "other")
    attempts = {
        "no client certificate": (None, None),
        "a self-signed certificate with a key of its own": self_signed(
            ec.generate_private_key(ec.SECP384R1()), tmp_path / "own"),
        "the organization's node key, self-signed as operator": self_signed(
            keys.load_org_private_key(org.private_key), tmp_path / "org"),
        "an operator certificate of another federation": (other / "operator-ops.pem", other / "operator-ops.key"),
        "the coordinator's server certificate (right CA, serverAuth)": (pki_dir / "server.pem",
                                                                       pki_dir / "server.key"),
    }
    request = pb.SubmitRequest(specialist="tickets", run_config=encode_run_config(TASK))
    for what, (cert, key) in attempts.items():
        with connect(api.address, pki_dir / "ca.pem", cert, key) as jobs:
            with pytest.raises(grpc.RpcError) as caught:
                jobs.Submit(request, timeout=10)
            # the handshake refuses each of them (BoringSSL checks the chain and the clientAuth purpose)
            assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                                           grpc.StatusCode.PERMISSION_DENIED), what
            with pytest.raises(grpc.RpcError):
                list(jobs.FetchSpecialist(pb.SpecialistRef(name="tickets"), timeout=10))
    # past the handshake (CA-signed, clientAuth) but not an operator's: refused by every call's check
    with connect(api.address, pki_dir / "ca.pem", *client_cert_not_operator(pki_dir, tmp_path / "client")) as jobs:
        for call in (lambda: jobs.List(pb.ListRequest(), timeout=10),
                     lambda: list(jobs.Watch(pb.JobRef(id="job-0001"), timeout=10))):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert superlink.runs == {}   # nothing was submitted
    with as_operator(pki_dir, api) as jobs:
        assert list(jobs.List(pb.ListRequest()).jobs) == []


def test_the_operator_commands_submit_watch_and_fetch(service, tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli.main import main as silotune

    pki_dir, api, _ = service
    for env, value in (("SILOTUNE_API", api.address), ("SILOTUNE_CA_CERT", pki_dir / "ca.pem"),
                       ("SILOTUNE_OPERATOR_CERT", pki_dir / "operator-ops.pem"),
                       ("SILOTUNE_OPERATOR_KEY", pki_dir / "operator-ops.key")):
        monkeypatch.setenv(env, str(value))
    sets = [arg for key, value in TASK.items() for arg in ("--set", f"{key}={value}")]
    assert silotune(["job", "submit", "--specialist", "tickets", *sets]) == 0
    assert "job-0001 queued" in capsys.readouterr().out
    assert silotune(["job", "watch", "job-0001"]) == 0
    watched = capsys.readouterr().out
    assert "round 1 done" in watched and "job-0001 finished: specialist tickets:1" in watched
    out = tmp_path / "fetched"
    assert silotune(["specialist", "fetch", "tickets:1", "--out", str(out)]) == 0
    folder = SpecialistRegistry(tmp_path / "state").get("tickets", 1).path
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert silotune(["specialist", "fetch", "tickets:1", "--out", str(out)]) == 2   # refuses a non-empty folder
    assert "not an empty folder" in capsys.readouterr().err
    assert silotune(["job", "cancel", "job-0001"]) == 2                               # it has ended
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


def test_the_generated_jobs_api_code_is_current(tmp_path: Path) -> None:
    """The committed jobs_pb2*.py are what protoc makes of jobs.proto (`make protos`)."""
    import filecmp
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "protos" / "silotune" / "v1").mkdir(parents=True)
    shutil.copy(root / "protos" / "silotune" / "v1" / "jobs.proto", tmp_path / "protos" / "silotune" / "v1")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", "protos/silotune/v1/jobs.proto"], cwd=tmp_path, check=True)
    for name in ("jobs_pb2.py", "jobs_pb2.pyi", "jobs_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "protos" / "silotune" / "v1" / name, root / "protos" / "silotune" / "v1" / name,
                           shallow=False), f"{name} is stale: run `make protos`"
