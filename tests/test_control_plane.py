"""The control plane is the operator's only (issue 11): server/gateway.py in front of the SuperLink.

Fast part (no Flower process): the route policy; a real gateway process
(`GatewayProcess`) in front of a recording fake upstream, to show what
reaches the upstream and what does not, that bodies stream both ways and are
capped, that forged forwarding headers are dropped; the operator listener's
mutual TLS against every credential an organization could hold; operator
certificates (`silotune pki operator-cert`).

Slow part: the real `silotune coordinator` (TLS + node authentication,
`--operator-port`), attacked by an outsider holding ca.pem and a node key of
its own with the real `flwr` CLI and with hand-crafted HTTPS requests; the
operator succeeds on the coordinator host and with an operator certificate;
an enrolled agent then joins through the gateway and completes the job.

Every process is started here and stopped by PID.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runtime import keys
from runtime.flower_processes import alive, free_port, stop_process_tree
from server import pki
from server.gateway import (
    FLEET,
    OPERATOR,
    TUNNEL,
    Decision,
    GatewayProcess,
    Listener,
    client_context,
    decide,
)
from server.superlink import SuperLinkExposed, SuperLinkProcess
from simulations.cli.main import main as silotune_main

SILOTUNE = str(Path(sys.executable).with_name("silotune"))
PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}
CAP = 1024 * 1024  # the test gateway's request cap


# ------------------------------------------------------------------ helpers
def make_pki(root: Path) -> Path:
    pki_dir = root / "pki"
    pki.init_ca(pki_dir, days=2)
    pki.issue_server_cert(pki_dir, ["127.0.0.1"], days=1)
    pki.issue_operator_cert(pki_dir, "ops", days=1)
    return pki_dir


def self_signed_operator_lookalike(org: keys.OrgKeyFiles, out: Path) -> tuple[Path, Path]:
    """What an organization can make on its own: its OpenSSH node key in a self-signed
    certificate that claims to be operator "ops" (clientAuth, OU=operator, the SAN)."""
    return self_signed_operator(keys.load_org_private_key(org.private_key), out)


def self_signed_operator(key: ec.EllipticCurvePrivateKey, out: Path) -> tuple[Path, Path]:
    """``key`` in a self-signed certificate that claims to be operator "ops"."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "silotune federation"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "operator"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "ops")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                "urn:silotune:operator:ops")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA384()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fake.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keys.write_private(out / "fake.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return out / "fake.pem", out / "fake.key"


def raw_request(address: str, request: bytes, context: ssl.SSLContext) -> bytes:
    """Send `request` byte for byte over TLS (no client library normalizes the path); return the reply."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            tls.sendall(request)
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    return reply


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


# ------------------------------------------------------------------ route policy
@pytest.mark.parametrize(("role", "method", "path", "raw", "status"), [
    (FLEET, "POST", "/v1/fleet/pull-messages", None, 0),
    (FLEET, "POST", "/v1/fleet/push-object", b"/v1/fleet/push-object", 0),
    (FLEET, "GET", "/health", None, 0),
    (FLEET, "HEAD", "/health", None, 0),
    (FLEET, "GET", "/v1/fleet/pull-messages", None, 405),
    (FLEET, "POST", "/v1/control/list-nodes", None, 403),
    (FLEET, "POST", "/v1/control/register-node", None, 403),
    (FLEET, "POST", "/v1/control/start-run", None, 403),
    (FLEET, "POST", "/v1/runtime/acquire-task", None, 403),
    (FLEET, "POST", "/v1/fleet/../control/list-nodes", None, 404),
    (FLEET, "POST", "/v1/fleet//pull-messages", None, 404),
    (FLEET, "POST", "/v1/fleet/pull-messages/", None, 404),
    (FLEET, "POST", "/v1/fleet/Pull-Messages", None, 404),
    (FLEET, "POST", "/v1/fleet/../control/list-nodes", b"/v1/fleet/%2e%2e/control/list-nodes", 400),
    (FLEET, "POST", "/v1/control/list-nodes", b"/v1/%63ontrol/list-nodes", 400),
    (FLEET, "GET", "/docs", None, 404),
    (FLEET, "GET", "/openapi.json", None, 404),
    (OPERATOR, "POST", "/v1/control/list-nodes", None, 0),
    (OPERATOR, "POST", "/v1/fleet/pull-messages", None, 403),
    (OPERATOR, "POST", "/v1/runtime/acquire-task", None, 403),
    (OPERATOR, "GET", "/v1/control/list-nodes", None, 405),
    (TUNNEL, "POST", "/v1/control/stream-logs", None, 0),
    (TUNNEL, "POST", "/v1/fleet/pull-messages", None, 403),
])
def test_route_policy(role: str, method: str, path: str, raw: bytes | None, status: int) -> None:
    assert decide(role, method, path, raw).status == status
    assert Decision().forward and not Decision(403).forward


def test_superlink_refuses_a_public_address(tmp_path: Path) -> None:
    with pytest.raises(SuperLinkExposed, match="Control API"):
        SuperLinkProcess().start(tmp_path, host="0.0.0.0")
    assert not (tmp_path / "superlink.log").exists()  # nothing was started


# ------------------------------------------------------------------ operator certificates
def test_operator_certificate_is_a_client_certificate_of_the_federation(tmp_path: Path) -> None:
    pki_dir = make_pki(tmp_path)
    ca = keys.load_ca(pki_dir / "ca.pem")
    cert = keys.load_certificate(pki_dir / "operator-ops.pem")
    cert.verify_directly_issued_by(ca)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(os.stat(pki_dir / "operator-ops.key").st_mode) == 0o600
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=1, minutes=10)
    assert pki.verify_operator_cert(pki_dir / "ca.pem", pki_dir / "operator-ops.pem",
                                    pki_dir / "operator-ops.key") == "ops"
    # the coordinator's server certificate is no operator certificate (EKU serverAuth only)
    with pytest.raises(keys.PkiError, match="EKU"):
        pki.verify_operator_cert(pki_dir / "ca.pem", pki_dir / "server.pem")
    other = make_pki(tmp_path / "other")
    with pytest.raises(keys.PkiWrongCA):
        pki.verify_operator_cert(pki_dir / "ca.pem", other / "operator-ops.pem")
    with pytest.raises(keys.PkiKeyMismatch):
        pki.verify_operator_cert(pki_dir / "ca.pem", pki_dir / "operator-ops.pem", other / "operator-ops.key")
    with pytest.raises(keys.PkiFileExists):
        pki.issue_operator_cert(pki_dir, "ops")
    with pytest.raises(keys.PkiBadName):
        pki.issue_operator_cert(pki_dir, "../x")


def test_pki_operator_cert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert silotune_main(["pki", "init", "--dir", d, "--days", "5"]) == 0
    assert silotune_main(["pki", "operator-cert", "--dir", d, "--name", "alice",
                          "--out", str(tmp_path / "alice"), "--days", "3"]) == 0
    assert "client authentication only" in capsys.readouterr().out
    assert pki.verify_operator_cert(Path(d) / "ca.pem", tmp_path / "alice" / "operator-alice.pem",
                                    tmp_path / "alice" / "operator-alice.key") == "alice"
    assert silotune_main(["pki", "operator-cert", "--dir", str(tmp_path / "none"), "--name", "alice"]) == 2
    assert "create the CA first" in capsys.readouterr().err


# ------------------------------------------------------------------ a gateway before a fake upstream
class Upstream:
    """A recording plain-HTTP upstream on 127.0.0.1 (uvicorn in a thread of this process)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.sizes: list[int] = []  # body bytes received, per request
        self.first_chunk = threading.Event()   # set when a request body's first chunk arrived
        self.release = threading.Event()       # the streaming response waits for it after chunk 1
        self.port = free_port()
        self.server = None
        self.thread = None

    async def app(self, scope, receive, send):  # type: ignore[no-untyped-def]
        import anyio

        if scope["type"] != "http":
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append((scope["method"], scope["path"], headers))
        digest, size = hashlib.sha256(), 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            if chunk:
                digest.update(chunk)
                size += len(chunk)
                self.first_chunk.set()
            if not message.get("more_body"):
                break
        self.sizes.append(size)
        if scope["path"] == "/v1/fleet/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first;", "more_body": True})
            while not self.release.is_set():
                await anyio.sleep(0.02)
            await send({"type": "http.response.body", "body": b"second", "more_body": False})
            return
        body = json.dumps({"size": size, "sha256": digest.hexdigest()}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"x-upstream", b"yes")]})
        await send({"type": "http.response.body", "body": body})

    def __enter__(self) -> Upstream:
        import uvicorn

        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, lifespan="off", interface="asgi3", ws="none",
                                log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.seen]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Upstream, GatewayProcess]]:
    root = tmp_path_factory.mktemp("gateway")
    pki_dir = make_pki(root)
    tls = pki.coordinator_files(pki_dir, ["127.0.0.1"])
    gateway = GatewayProcess()
    with Upstream() as upstream:
        try:
            gateway.start(root / "state", f"http://127.0.0.1:{upstream.port}",
                          [Listener(FLEET, "127.0.0.1", 0), Listener(OPERATOR, "127.0.0.1", 0)],
                          tls=tls, max_request_bytes=CAP)
            yield pki_dir, upstream, gateway
        finally:
            pid = gateway.proc.pid if gateway.proc else None
            stopped = gateway.stop(grace=5)
            assert pid is None or (pid in stopped and alive(stopped) == [])


def test_public_listener_forwards_the_fleet_api_and_nothing_else(plane) -> None:  # type: ignore[no-untyped-def]
    pki_dir, upstream, gateway = plane
    address = gateway.listener(FLEET).address
    ca = client_context(pki_dir / "ca.pem")
    with httpx.Client(verify=ca, base_url=f"https://{address}") as client:
        before = len(upstream.seen)
        ok = client.post("/v1/fleet/pull-messages", content=b"abc", headers={
            **PROTOBUF, "x-forwarded-for": "10.6.6.6", "forwarded": "for=10.6.6.6",
            "x-flwr-signature": "c2ln", "connection": "keep-alive, x-drop-me", "x-drop-me": "1"})
        assert ok.status_code == 200 and ok.headers["x-upstream"] == "yes"
        assert ok.json() == {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}
        method, path, headers = upstream.seen[-1]
        assert (method, path) == ("POST", "/v1/fleet/pull-messages")
        assert headers["x-forwarded-for"] == "127.0.0.1" and headers["x-forwarded-proto"] == "https"
        assert "forwarded" not in headers and "x-drop-me" not in headers
        assert headers["x-flwr-signature"] == "c2ln"  # node-auth headers pass untouched
        assert client.get("/health").status_code == 200
        refused = {path: client.post(path, content=b"\x00", headers=PROTOBUF).status_code for path in (
            "/v1/control/register-node", "/v1/control/unregister-node", "/v1/control/list-nodes",
            "/v1/control/start-run", "/v1/control/list-runs", "/v1/runtime/acquire-task", "/docs")}
        assert refused == {"/v1/control/register-node": 403, "/v1/control/unregister-node": 403,
                           "/v1/control/list-nodes": 403, "/v1/control/start-run": 403,
                           "/v1/control/list-runs": 403, "/v1/runtime/acquire-task": 403, "/docs": 404}
        assert client.get("/v1/fleet/pull-messages").status_code == 405
    # paths that a client library would normalize, sent byte for byte
    for target in (b"/v1/fleet/../control/list-nodes", b"/v1/fleet/%2e%2e/control/list-nodes",
                   b"/v1/fleet/..%2fcontrol/list-nodes", b"//v1/control/list-nodes",
                   b"/v1/control/list-nodes?x=/v1/fleet/a", b"/v1/%63ontrol/list-nodes"):
        reply = raw_request(address, b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                            b"Connection: close\r\n\r\n", ca)
        assert status_of(reply) in (400, 403, 404), (target, reply[:200])
    assert [p for p in upstream.paths()[before:] if not p.startswith("/v1/fleet/") and p != "/health"] == []
    assert upstream.paths()[before:] == ["/v1/fleet/pull-messages", "/health"]


def test_bodies_stream_both_ways_and_are_capped(plane) -> None:  # type: ignore[no-untyped-def]
    pki_dir, upstream, gateway = plane
    address = gateway.listener(FLEET).address
    with httpx.Client(verify=client_context(pki_dir / "ca.pem"), base_url=f"https://{address}",
                      timeout=30) as client:
        # the largest body allowed passes intact
        body = os.urandom(CAP)
        reply = client.post("/v1/fleet/push-object", content=body, headers=PROTOBUF)
        assert reply.json() == {"size": CAP, "sha256": hashlib.sha256(body).hexdigest()}
        # a request body is forwarded while it is still being sent (chunked, no Content-Length)
        upstream.first_chunk.clear()

        def slow_body() -> Iterator[bytes]:
            yield b"x" * 1000
            assert upstream.first_chunk.wait(20), "the gateway held the body back"
            yield b"y" * 1000

        assert client.post("/v1/fleet/push-object", content=slow_body()).json()["size"] == 2000
        # a response is relayed while the upstream is still producing it
        upstream.release.clear()
        with client.stream("POST", "/v1/fleet/stream", content=b"") as streamed:
            chunks = streamed.iter_raw()
            assert next(chunks) == b"first;"  # arrives before the upstream may send the rest
            upstream.release.set()
            assert b"".join(chunks) == b"second"
        before = len(upstream.seen)
        # over the cap: refused on the declared length, or cut while streaming
        assert client.post("/v1/fleet/push-object", content=os.urandom(CAP + 1)).status_code == 413
        too_long = (b"z" * 65536 for _ in range(CAP // 65536 + 2))
        assert client.post("/v1/fleet/push-object", content=too_long).status_code == 413
        time.sleep(0.5)
        assert len(upstream.seen) - before <= 1  # only the chunked one began, and was cut
        assert all(size <= CAP for size in upstream.sizes[before:])


def test_upstream_down_is_a_502(tmp_path: Path) -> None:
    gateway = GatewayProcess()
    try:
        gateway.start(tmp_path, f"http://127.0.0.1:{free_port()}", [Listener(FLEET, "127.0.0.1", 0)])
        reply = httpx.post(f"http://{gateway.listener(FLEET).address}/v1/fleet/get-run", content=b"")
        assert reply.status_code == 502
        assert httpx.post(f"http://{gateway.listener(FLEET).address}/v1/control/list-runs").status_code == 403
    finally:
        assert alive(gateway.stop(grace=5)) == []


def test_operator_listener_demands_an_operator_certificate(plane, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pki_dir, upstream, gateway = plane
    operator, public = gateway.listener(OPERATOR).address, gateway.listener(FLEET).address
    ca = pki_dir / "ca.pem"
    as_operator = client_context(ca, pki_dir / "operator-ops.pem", pki_dir / "operator-ops.key")
    with httpx.Client(verify=as_operator) as client:
        reply = client.post(f"https://{operator}/v1/control/list-nodes", content=b"", headers=PROTOBUF)
        assert reply.status_code == 200 and upstream.seen[-1][1] == "/v1/control/list-nodes"
        # the operator listener serves the Control API only; the public one never serves it
        assert client.post(f"https://{operator}/v1/fleet/pull-messages").status_code == 403
        assert client.post(f"https://{public}/v1/control/list-nodes").status_code == 403
    before = len(upstream.seen)

    org = keys.create_org_key(tmp_path / "keys", "bank-a")
    other = make_pki(tmp_path / "other")
    attempts = {
        "no client certificate": client_context(ca),
        "an operator certificate of another CA": client_context(ca, other / "operator-ops.pem",
                                                                other / "operator-ops.key"),
        "the organization's node key, self-signed as operator": client_context(
            ca, *self_signed_operator_lookalike(org, tmp_path / "fake")),
        "the coordinator's server certificate (right CA, serverAuth)": client_context(
            ca, pki_dir / "server.pem", pki_dir / "server.key"),
    }
    request = b"POST /v1/control/list-nodes HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    for what, context in attempts.items():
        with pytest.raises(httpx.TransportError):
            httpx.post(f"https://{operator}/v1/control/list-nodes", verify=context, content=b"")
        # TLS 1.3: the client's half of the handshake ends first; the server then verifies the
        # certificate, aborts the handshake and closes: no HTTP reply, whatever was sent
        try:
            assert raw_request(operator, request, context) == b"", what
        except (ssl.SSLError, ConnectionError):
            pass
        # TLS 1.2: the server's verdict comes before the client's handshake completes
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            raw_request(operator, request, context)
    assert len(upstream.seen) == before  # none of them reached the upstream
    assert "operator ops" in gateway.log_tail(200)  # who did what is logged


# ------------------------------------------------------------------ the real coordinator, attacked
OUTSIDER_APP = {
    "pyproject.toml": (
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "outsider-app"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "outsider"\n\n'
        '[tool.flwr.app.components]\nserverapp = "app:server"\nclientapp = "app:client"\n\n'
        '[tool.flwr.app.config]\n'),
    "app.py": ("from flwr.clientapp import ClientApp\nfrom flwr.serverapp import ServerApp\n\n"
               "server = ServerApp()\nclient = ClientApp()\n"),
}


def flwr_home(path: Path, connections: dict[str, str], ca: Path | None) -> dict[str, str]:
    """A FLWR_HOME with one connection per name (address; TLS with `ca`, else plain HTTP)."""
    from runtime.flower_processes import flower_env

    path.mkdir(parents=True, exist_ok=True)
    text = f'[superlink]\ndefault = "{next(iter(connections))}"\n'
    for name, address in connections.items():
        text += f'\n[superlink.{name}]\naddress = "{address}"\n'
        text += f'insecure = false\nroot-certificates = "{ca}"\n' if ca else "insecure = true\n"
    (path / "config.toml").write_text(text)
    return flower_env(path)


def flwr(env: dict[str, str], *args: str) -> dict:
    """The real `flwr` CLI, `--format json`; its JSON answer (exit code and JSON both kept)."""
    result = subprocess.run([str(Path(sys.executable).with_name("flwr")), *args, "--format", "json"], env=env,
                            cwd=env["FLWR_HOME"], capture_output=True, text=True, timeout=120, check=False)
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError:
        data = {"success": False, "error-message": result.stdout[-500:] + result.stderr[-500:]}
    data["returncode"] = result.returncode
    return data


@pytest.mark.slow
def test_outsider_cannot_drive_the_coordinator_operator_can_and_an_agent_still_joins(tmp_path: Path) -> None:
    from flwr.proto.control_pb2 import (
        ListNodesRequest,
        ListNodesResponse,
        ListRunsRequest,
        RegisterNodeRequest,
        StartRunRequest,
        UnregisterNodeRequest,
    )
    from test_secure_deployment import read_flat, survivors, wait_for_text, write_silo

    from clients.silo.corpora import load_bbc_news
    from server.enrollment import enrollments
    from server.superlink import CONNECTION_NAME, run_flwr_json

    pki_dir = make_pki(tmp_path)
    ca = pki_dir / "ca.pem"
    orgs = {name: keys.create_org_key(tmp_path / f"{name}-keys", name) for name in ("bank-a", "bank-b", "mallory")}
    other_ca = make_pki(tmp_path / "other")
    app = tmp_path / "outsider-app"
    app.mkdir()
    for name, text in OUTSIDER_APP.items():
        (app / name).write_text(text)
    port, operator_port, tunnel_port = free_port(), free_port(), free_port()
    public, operator = f"127.0.0.1:{port}", f"127.0.0.1:{operator_port}"
    state_dir, run_dir = tmp_path / "coord", tmp_path / "run"
    settings = {"model": "tiny-llama", "job-id": "control-plane-test", "num-rounds": 1, "min-nodes": 1,
                "local-steps": 1, "max-length": 64, "eval-max-examples": 4, "round-timeout": 120,
                "node-wait-timeout": 240, "run-dir": str(run_dir)}
    coordinator_cmd = [SILOTUNE, "coordinator", "--pki-dir", str(pki_dir),
                       "--enroll", f"bank-a={orgs['bank-a'].public_key}", "--state-dir", str(state_dir),
                       "--port", str(port), "--operator-port", str(operator_port), "--timeout", "400",
                       "--unsigned-app"]  # signed apps: tests/test_signed_app_deployment.py
    for key, value in settings.items():
        coordinator_cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("coordinator", "tunnel", "bank-a")}
    processes: dict[str, subprocess.Popen] = {}
    leftovers: list[int] = []

    def control(path: str, message, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
        return httpx.post(f"https://{kwargs.pop('at', public)}{path}", content=message.SerializeToString(),
                          headers=PROTOBUF, timeout=30, **kwargs)

    marks: list[tuple[str, float]] = []
    clock = [time.monotonic()]

    def mark(what: str) -> None:
        now = time.monotonic()
        marks.append((what, now - clock[0]))
        clock[0] = now

    try:
        processes["coordinator"] = subprocess.Popen(coordinator_cmd, stdout=logs["coordinator"],
                                                    stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        wait_for_text(tmp_path / "coordinator.log", "(TLS, node auth)", 120, processes["coordinator"])
        mark("coordinator up")
        (bank_a,) = enrollments(state_dir)
        assert "loopback only" in read_flat(tmp_path / "coordinator.log")

        # 1. the outsider (ca.pem + a node key of its own), with the real `flwr` CLI
        outsider = flwr_home(tmp_path / "outsider", {"public": public, "operator": operator}, ca)
        attacks = {"register its key": ["supernode", "register", str(orgs["mallory"].public_key)],
                   "unregister bank-a": ["supernode", "unregister", str(bank_a.node_id)],
                   "list nodes": ["supernode", "list"], "list runs": ["ls"], "start a run": ["run", str(app)]}
        for what, args in attacks.items():
            answer = flwr(outsider, *args, "public")
            assert answer["success"] is False, (what, answer)
            assert "Control API is not served on this port" in answer["error-message"], (what, answer)
        # the operator port: the `flwr` CLI presents no client certificate, so no handshake
        answer = flwr(outsider, *attacks["register its key"], "operator")
        assert answer["success"] is False and "unavailable" in answer["error-message"], answer
        mark("outsider, flwr CLI")

        # 2. the outsider, by hand: HTTPS requests to the Control API's paths
        mallory_key = orgs["mallory"].public_key.read_bytes()
        requests = {"/v1/control/register-node": RegisterNodeRequest(public_key=mallory_key, name="mallory"),
                    "/v1/control/unregister-node": UnregisterNodeRequest(node_id=bank_a.node_id),
                    "/v1/control/list-nodes": ListNodesRequest(),
                    "/v1/control/start-run": StartRunRequest(),
                    "/v1/control/list-runs": ListRunsRequest()}
        for path, message in requests.items():
            assert control(path, message, verify=client_context(ca)).status_code == 403, path
            with pytest.raises(httpx.TransportError):
                control(path, message, at=operator, verify=client_context(ca))

        mark("outsider, by hand")

        # 3. the operator on the coordinator host: loopback to the SuperLink
        nodes = run_flwr_json(state_dir, "supernode", "list", CONNECTION_NAME)["nodes"]
        assert [int(n["node-id"]) for n in nodes] == [bank_a.node_id]  # mallory never got in; bank-a still in
        runs = run_flwr_json(state_dir, "ls", CONNECTION_NAME)["runs"]
        assert all("outsider" not in json.dumps(run) for run in runs), runs
        enrolled = subprocess.run([SILOTUNE, "pki", "enroll", "--coordinator-dir", str(state_dir), "--name", "bank-b",
                                   "--public-key", str(orgs["bank-b"].public_key)],
                                  capture_output=True, text=True, env=env, timeout=120, check=False)
        assert enrolled.returncode == 0, enrolled.stderr
        bank_b = enrollments(state_dir)[1]
        mark("operator on the host")

        # 4. the operator elsewhere: mutual TLS with an operator certificate
        as_operator = client_context(ca, pki_dir / "operator-ops.pem", pki_dir / "operator-ops.key")
        reply = control("/v1/control/list-nodes", ListNodesRequest(), at=operator, verify=as_operator)
        assert reply.status_code == 200, reply.text
        listed = ListNodesResponse()
        listed.ParseFromString(reply.content)
        assert {n.node_id for n in listed.nodes_info} == {bank_a.node_id, bank_b.node_id}
        for context in (client_context(ca), client_context(ca, other_ca / "operator-ops.pem",
                                                           other_ca / "operator-ops.key")):
            with pytest.raises(httpx.TransportError):
                control("/v1/control/list-nodes", ListNodesRequest(), at=operator, verify=context)
        # the operator unregisters bank-b from afar
        reply = control("/v1/control/unregister-node", UnregisterNodeRequest(node_id=bank_b.node_id),
                        at=operator, verify=as_operator)
        assert reply.status_code == 200, reply.text
        # ... and with the `flwr` CLI through `silotune operator-tunnel` on the operator's machine
        processes["tunnel"] = subprocess.Popen(
            [SILOTUNE, "operator-tunnel", "--coordinator", operator, "--ca-cert", str(ca),
             "--cert", str(pki_dir / "operator-ops.pem"), "--key", str(pki_dir / "operator-ops.key"),
             "--port", str(tunnel_port), "--state-dir", str(tmp_path / "tunnel")],
            stdout=logs["tunnel"], stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        wait_for_text(tmp_path / "tunnel.log", "flwr supernode list", 60, processes["tunnel"])
        tunnel_env = {**env, "FLWR_HOME": str(tmp_path / "tunnel" / "flwr-home")}
        answer = flwr(tunnel_env, "supernode", "list", "coordinator")
        assert answer["success"] is True, answer
        assert {int(n["node-id"]) for n in answer["nodes"] if n["status"] != "unregistered"} == {bank_a.node_id}
        processes["tunnel"].send_signal(signal.SIGTERM)
        assert processes["tunnel"].wait(timeout=30) == 0
        mark("operator elsewhere")

        # 5. the enrolled organization joins through the gateway and the job completes
        silo = write_silo(tmp_path / "bank-a.jsonl", load_bbc_news()[:40])
        processes["bank-a"] = subprocess.Popen(
            [SILOTUNE, "agent", "start", "--no-resident", "--coordinator", public, "--data", str(silo),
             "--name", "bank-a", "--state-dir", str(tmp_path / "bank-a"), "--ca-cert", str(ca),
             "--private-key", str(orgs["bank-a"].private_key), "--unsigned-apps"],
            stdout=logs["bank-a"], stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        code = processes["coordinator"].wait(timeout=400)
        assert code == 0, (tmp_path / "coordinator.log").read_text()[-4000:]
        assert "certificate verified" in read_flat(tmp_path / "bank-a.log")
        processes["bank-a"].send_signal(signal.SIGTERM)
        assert processes["bank-a"].wait(timeout=60) == 0, (tmp_path / "bank-a.log").read_text()[-3000:]
        mark("agent and job")
    finally:
        print("phases:", ", ".join(f"{what} {seconds:.0f}s" for what, seconds in marks))
        for process in processes.values():
            if process.poll() is None:
                leftovers += stop_process_tree(process.pid, grace=5)
        for handle in logs.values():
            handle.close()
    assert leftovers == [] and alive([p.pid for p in processes.values()]) == []
    assert survivors(tmp_path) == []  # SuperLink, gateway, SuperNode, tunnel: all gone

    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["organizations"]) == ["bank-a"] and report["history"][1]["accepted"] == ["bank-a"]
    gateway_log = read_flat(state_dir / "gateway.log")
    assert "refused POST /v1/control/register-node" in gateway_log and "(operator ops)" in gateway_log
