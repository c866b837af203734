"""The operator's dashboard (server/dashboard/): its JSON API on a prepared state directory, the
page's promise to treat network text as text, no route that writes, and who may open it: on a
real uvicorn listener with mutual TLS, only an operator certificate; an organization's node key,
an outsider and the coordinator's own certificate are refused. The page itself, in a browser
during a running job, is tests/test_dashboard_browser.py."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from starlette.testclient import TestClient

from runtime import keys
from server import pki
from server.dashboard.app import STATIC, dashboard_app
from server.dashboard.server import DashboardServer
from server.events import EVENTS_FILE, EventsFile
from server.gateway import client_context
from server.service.store import Job, JobStore
from server.specialists import DATABASE as SPECIALISTS_DATABASE
from server.specialists import SpecialistRegistry
from test_control_plane import make_pki, raw_request, self_signed_operator_lookalike

HOSTILE = '<img src=x onerror="alert(1)">bank-a</td><script>alert(2)</script>'


def submit(state_dir: Path, specialist: str, *, running: bool, **spec: object) -> Job:
    """A job as the coordinator service records it (server/service/store.py, the real writer)."""
    store = JobStore(state_dir)
    job = store.create(specialist, spec)
    return store.mark_running(job.id) if running else job


def evaluation(accuracy: float) -> dict:
    return {"num_examples": 4.0, "loss": 2.0 - accuracy, "accuracy": accuracy, "resident_pid": 99.0}


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """Two jobs: ``job-0001`` finished round 1 (one update rejected, one evaluation refused, ε spent)
    and is in round 2; ``job-0002`` is queued. One organization's name is markup."""
    state = tmp_path / "state"
    running = submit(state, "dp-topics", running=True, **{"num-rounds": 3, "metric": "accuracy",
                                                          "strategy": "dp-fedavg"})
    submit(state, "later", running=False)
    events = EventsFile(Path(running.run_dir) / EVENTS_FILE, running.id)
    events.round_finished(0, {"round": 0, "eval": {"bank-b": evaluation(0.25), HOSTILE: evaluation(0.5)},
                              "eval_overall": evaluation(0.375), "eval_rejected": []})
    events.round_started(1, 3)
    events.reply(1, "bank-b", True, "n=10 |Δ|=0.1")
    events.reply(1, HOSTILE, True, "n=12 |Δ|=0.2")
    events.reply(1, "bank-c", False, "non-finite: NaN in lora_A")
    events.round_finished(1, {
        "round": 1, "sampled": 3, "attempts": 1, "accepted": ["bank-b", HOSTILE],
        "rejected": [{"org": "bank-c", "reason": "non-finite", "detail": "NaN in lora_A"}],
        "timed_out": [], "train_loss": 1.5, "train_seconds": 2.0, "privacy": {"epsilon": 0.75, "delta": 1e-5},
        "bytes": {"down": 3000, "up": 2000},
        "eval": {"bank-b": evaluation(0.5), HOSTILE: evaluation(0.75)}, "eval_overall": evaluation(0.625),
        "eval_rejected": [{"org": "bank-c", "reason": "bad-metrics", "detail": "accuracy 7 > 1"}]})
    events.round_started(2, 3)
    events.reply(2, HOSTILE, True, "n=12 |Δ|=0.1")
    return state


# ------------------------------------------------------------------ the API
def test_the_api_shows_jobs_rounds_rejections_epsilon_and_each_organizations_curve(state_dir: Path) -> None:
    client = TestClient(dashboard_app(state_dir))

    jobs = client.get("/api/jobs").json()["jobs"]
    assert [(j["id"], j["state"], j["current_round"]) for j in jobs] == [("job-0002", "queued", None),
                                                                         ("job-0001", "running", 2)]
    running = jobs[1]
    assert running["specialist"] == "dp-topics" and running["num_rounds"] == 3
    assert running["strategy"] == "dp-fedavg" and running["started_at"]
    assert running["epsilon"] == 0.75 and running["bytes"] == 5000   # round 0's events carry no bytes

    view = client.get("/api/jobs/job-0001").json()
    assert view["current_round"] == 2
    assert [(r["round"], r["state"]) for r in view["rounds"]] == [(0, "finished"), (1, "finished"), (2, "running")]
    one = view["rounds"][1]
    assert one["sampled"] == 3 and one["train_loss"] == 1.5 and one["epsilon"] == 0.75 and one["bytes"] == 5000
    assert view["rounds"][0]["bytes"] is None
    assert one["accepted"] == ["bank-b", HOSTILE]
    assert one["rejected"] == [{"org": "bank-c", "reason": "non-finite", "detail": "NaN in lora_A"}]
    assert one["eval_rejected"][0]["reason"] == "bad-metrics"
    assert one["eval"]["bank-b"]["accuracy"] == 0.5
    assert [r["org"] for r in view["rounds"][2]["replies"]] == [HOSTILE]   # the round under way, so far
    assert view["curve_metric"] == "accuracy"
    assert view["curves"]["organizations"]["accuracy"] == {"bank-b": [[0, 0.25], [1, 0.5]],
                                                          HOSTILE: [[0, 0.5], [1, 0.75]]}
    assert view["curves"]["overall"]["accuracy"] == [[0, 0.375], [1, 0.625]]
    assert "resident_pid" not in view["curves"]["organizations"]   # bookkeeping, not a curve
    assert "bytes" in view["not_recorded"]
    assert client.get("/api/jobs/nope").status_code == 404


def test_a_retried_round_counts_from_its_last_start(tmp_path: Path) -> None:
    job = submit(tmp_path, "retried", running=True)
    events = EventsFile(Path(job.run_dir) / EVENTS_FILE, job.id)
    events.round_started(1, 2)
    events.reply(1, "bank-a", False, "timeout")
    events.round_started(1, 2)   # below quorum: retried with a fresh sample
    events.reply(1, "bank-b", True, "n=1")
    rounds = TestClient(dashboard_app(tmp_path)).get(f"/api/jobs/{job.id}").json()["rounds"]
    assert len(rounds) == 1 and rounds[0]["attempts"] == 2
    assert [r["org"] for r in rounds[0]["replies"]] == ["bank-b"] and rounds[0]["accepted"] == ["bank-b"]


def test_the_registered_specialists_are_listed(tmp_path: Path) -> None:
    SpecialistRegistry(tmp_path)   # the registry's own schema
    conn = sqlite3.connect(tmp_path / SPECIALISTS_DATABASE)
    conn.execute("INSERT INTO specialists (name, version, created_at, job_id, base_model, task_spec, metrics, "
                 "metric, provenance, epsilon, secure_aggregation, adapter_sha256, path, parent, rounds) "
                 "VALUES ('bbc-topics', 2, '2026-01-02', 'job-2', 'smollm2-135m', '{}', '{}', 'accuracy', '{}', "
                 "1.5, 1, 'ab12', 'specialists/bbc-topics/v2', 'bbc-topics:1', 3)")
    conn.commit()
    conn.close()
    [row] = TestClient(dashboard_app(tmp_path)).get("/api/specialists").json()["specialists"]
    assert row["ref"] == "bbc-topics:2" and row["parent"] == "bbc-topics:1"
    assert row["epsilon"] == 1.5 and row["secure_aggregation"] is True and row["rounds"] == 3
    assert "provenance" not in row


def test_an_empty_state_dir_is_empty_lists_and_stays_empty(tmp_path: Path) -> None:
    client = TestClient(dashboard_app(tmp_path))
    assert client.get("/api/jobs").json()["jobs"] == []
    assert client.get("/api/specialists").json()["specialists"] == []
    assert list(tmp_path.iterdir()) == []   # read-only: no database is created


@pytest.mark.parametrize("path", ["/", "/api/jobs", "/api/jobs/job-0001", "/api/specialists", "/static/dashboard.js"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_no_route_changes_anything(state_dir: Path, method: str, path: str) -> None:
    assert TestClient(dashboard_app(state_dir)).request(method, path).status_code == 405


# ------------------------------------------------------------------ text from the network stays text
def test_a_hostile_organization_name_is_returned_as_data(state_dir: Path) -> None:
    client = TestClient(dashboard_app(state_dir))
    reply = client.get("/api/jobs/job-0001")
    assert reply.headers["content-type"] == "application/json"
    assert HOSTILE in reply.json()["curves"]["organizations"]["accuracy"]
    assert "<script>" not in client.get("/").text   # the page is static: no data is rendered into it
    policy = client.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy


def test_the_page_inserts_data_as_text_only() -> None:
    script = (STATIC / "dashboard.js").read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "DOMParser", "createContextualFragment", "srcdoc"):
        assert sink not in script, sink
    assert "textContent" in script
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)   # no inline script
    assert not re.search(r"\son[a-z]+=", html)               # no inline handler


def test_the_chart_library_is_served_by_the_dashboard_itself(state_dir: Path) -> None:
    client = TestClient(dashboard_app(state_dir))
    page = client.get("/").text
    sources = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', page)
    assert sources and all(s.startswith("/static/") for s in sources)   # no CDN: the machines are offline
    for source in sources:
        assert client.get(source).status_code == 200, source
    assert client.get("/static/vendor/chart.umd.min.js").text.startswith("/*!\n * Chart.js v4.")
    assert (STATIC / "vendor" / "chart.js-LICENSE.md").read_text().startswith("The MIT License")


# ------------------------------------------------------------------ who may open it
def ca_signed_client_cert(pki_dir: Path, out: Path) -> tuple[Path, Path]:
    """A client certificate the federation's CA did sign, but not as an operator (no OU=operator, no SAN)."""
    ca = x509.load_pem_x509_certificate((pki_dir / pki.CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((pki_dir / pki.CA_KEY).read_bytes(), None)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bank-a")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    (out / "client.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keys.write_private(out / "client.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return out / "client.pem", out / "client.key"


def test_only_an_operator_certificate_opens_the_dashboard(state_dir: Path, tmp_path: Path) -> None:
    pki_dir = make_pki(tmp_path)
    ca = pki_dir / pki.CA_CERT
    org = keys.create_org_key(tmp_path / "keys", "bank-a")
    other = make_pki(tmp_path / "other")
    with DashboardServer(state_dir, "127.0.0.1", 0, tls=pki.coordinator_files(pki_dir)) as server:
        assert server.port != 0 and server.url == f"https://127.0.0.1:{server.port}/"
        as_operator = client_context(ca, pki_dir / "operator-ops.pem", pki_dir / "operator-ops.key")
        with httpx.Client(verify=as_operator) as client:
            assert client.get(f"{server.url}api/jobs").json()["jobs"][1]["id"] == "job-0001"
            assert "Learning curves" in client.get(server.url).text
            assert client.post(f"{server.url}api/jobs").status_code == 405

        refused_in_the_handshake = {
            "an outsider, no client certificate": client_context(ca),
            "an outsider, an operator certificate of another CA": client_context(
                ca, other / "operator-ops.pem", other / "operator-ops.key"),
            "an organization's node key, self-signed as operator": client_context(
                ca, *self_signed_operator_lookalike(org, tmp_path / "fake")),
            "the coordinator's own server certificate": client_context(
                ca, pki_dir / "server.pem", pki_dir / "server.key"),
        }
        request = b"GET /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        for what, context in refused_in_the_handshake.items():
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{server.url}api/jobs", verify=context)
            # TLS 1.3: the server aborts after the client's half of the handshake: no HTTP reply at all
            try:
                assert raw_request(f"127.0.0.1:{server.port}", request, context) == b"", what
            except (ssl.SSLError, ConnectionError):
                pass

        # signed by the federation's CA for client authentication, but not an operator's
        not_operator = client_context(ca, *ca_signed_client_cert(pki_dir, tmp_path / "client"))
        reply = httpx.get(f"{server.url}api/jobs", verify=not_operator)
        assert reply.status_code == 403 and "operator certificate" in reply.text
        assert httpx.get(server.url, verify=not_operator).status_code == 403


def test_without_tls_the_dashboard_is_served_on_loopback_only(state_dir: Path) -> None:
    for host in ("0.0.0.0", "192.0.2.1", "::"):
        with pytest.raises(ValueError, match="127.0.0.1 only"):
            DashboardServer(state_dir, host, 0)
    with DashboardServer(state_dir, "127.0.0.1", 0) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/"
        assert httpx.get(f"{server.url}api/jobs").status_code == 200
        # a page elsewhere that rebinds its own name to 127.0.0.1 is refused by Host
        assert httpx.get(f"{server.url}api/jobs", headers={"Host": "attacker.example"}).status_code == 400
    with pytest.raises(httpx.TransportError):   # stopped: nothing listens any more
        httpx.get(f"{server.url}api/jobs", timeout=2)
