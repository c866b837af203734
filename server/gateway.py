"""The coordinator's public front: a reverse proxy that lets organizations reach the Fleet API only.

Why: flwr 1.41's SuperLink serves the Fleet API (SuperNodes), the Control API
(the `flwr` CLI: start/stop/list runs, register/unregister/list nodes) and
the Runtime API (ServerApp processes) over HTTP on ONE port, and the Control
API has no account login in the open-source build. Exposed as it was, anyone
who reached that port and held `ca.pem` (every organization does) could
register a node key of its own, list the nodes, unregister an enrolled
organization and start runs. TLS and node authentication guard the Fleet
routes only.

So the SuperLink listens on 127.0.0.1 only (server/superlink.py refuses any
other address) and this gateway, a separate process (`python -m
server.gateway`, `GatewayProcess`), is the only thing that listens on the
coordinator's public address. Each listener has a role that fixes what it
forwards; the check is on the server side, in front of the SuperLink, so no
client can skip it:

- `fleet` (`silotune coordinator --bind/--port`, what agents dial): TLS with
  the coordinator's server.pem/server.key (the same certificate the
  SuperLink serves, so agents verify it against ca.pem exactly as before)
  and forwards only `POST /v1/fleet/<route>` and `GET|HEAD /health`. Node
  authentication is unchanged: the SuperNode's signature headers pass
  through and the SuperLink checks them. `/v1/control/…` and `/v1/runtime/…`
  get 403, anything else 404, without reaching the SuperLink.
- `operator` (`--operator-port`, off by default): mutual TLS. The handshake
  itself requires a client certificate that chains to the federation's CA
  and is fit for client authentication (OpenSSL's server-side purpose
  check, `ssl.CERT_REQUIRED`); `silotune pki operator-cert` issues them
  (EKU clientAuth, OU=operator, SAN urn:silotune:operator:NAME). Every
  connection's certificate is checked again here (server.pki.operator_name)
  and the operator's name is logged with each call. It forwards only
  `POST /v1/control/<route>` (and /health). What an organization holds
  cannot open it: ca.pem is a certificate without its key, an OpenSSH node
  key is no X.509 certificate, a self-signed or other-CA certificate fails
  the chain, and the coordinator's server certificate (EKU serverAuth) fails
  the purpose check.
- `tunnel` (`silotune operator-tunnel`, on the operator's own machine):
  plain HTTP on 127.0.0.1, forwards `/v1/control/…` to a coordinator's
  operator listener presenting the operator certificate, because the `flwr`
  CLI cannot present a client certificate itself.

An **authenticated operator** is therefore either someone on the coordinator
host (loopback to the SuperLink: `silotune pki enroll/revoke/list`, the
coordinator's own run submission, any `flwr` CLI with the coordinator's
FLWR_HOME; protect that host like the CA key) or someone elsewhere holding an
operator certificate and its key, through the operator listener.

Forwarding: request and response bodies are streamed both ways (at most 16
socket reads of a request queued, response chunks relayed as they are read;
never a whole body in memory), so large replies and `flwr log --stream` pass
through; a client that goes away cancels its upstream request. Request bodies are capped
(`MAX_REQUEST_BYTES`, 64 MiB by default: Flower ships arrays in chunks of
5 MiB — FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE — one chunk per push-object
request, and the `flwr` CLI's app bundles are at most 10 MB; a larger
declared Content-Length gets 413 before anything is forwarded, a chunked
body is cut at the cap). The job's own reply limit is `max-update-bytes`,
checked by the ServerApp (server/validation.py). Hop-by-hop headers and any
client-sent Forwarded/X-Forwarded-* headers are dropped; X-Forwarded-For and
X-Forwarded-Proto are set to the real peer (the SuperLink's uvicorn trusts
them from 127.0.0.1, so its log shows the real client). Query strings are
not forwarded (Flower's routes use none). Upstream unreachable: 502;
upstream timeout: 504. The SuperNode's client (flwr/supercore/protobuf/
client.py) is httpx over HTTP/1.1 with unary protobuf bodies; the Control
API's log stream is a chunked protobuf-frame response, relayed chunk by
chunk. The event loop is uvloop where installed (SILOTUNE_GATEWAY_LOOP=asyncio
to opt out). Refused TLS handshakes are not logged by the event loop; every
refused request and every forwarded operator call is (`state_dir/gateway.log`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from runtime.flower_processes import LOCALHOST, TAG_ENV, ManagedProcess, dial_address, dial_host, free_port, wait_for_port

log = logging.getLogger("silotune.gateway")

FLEET = "fleet"
OPERATOR = "operator"
TUNNEL = "tunnel"
ROLES = (FLEET, OPERATOR, TUNNEL)

MAX_REQUEST_BYTES = 64 * 1024 * 1024
HEALTH_PATH = "/health"
FLEET_ROUTE = re.compile(r"/v1/fleet/[a-z0-9]+(?:-[a-z0-9]+)*")
CONTROL_ROUTE = re.compile(r"/v1/control/[a-z0-9]+(?:-[a-z0-9]+)*")
_ALLOWED = {FLEET: FLEET_ROUTE, OPERATOR: CONTROL_ROUTE, TUNNEL: CONTROL_ROUTE}
#: API prefixes that exist on the SuperLink but that a role must not reach: 403 rather than 404
_FORBIDDEN = {FLEET: ("/v1/control/", "/v1/runtime/"),
              OPERATOR: ("/v1/fleet/", "/v1/runtime/"),
              TUNNEL: ("/v1/fleet/", "/v1/runtime/")}
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                         "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
#: request headers never forwarded: hop-by-hop, Host (set for the upstream), Expect (answered here),
#: and forwarding headers a client could forge (the SuperLink trusts them from 127.0.0.1)
_REQUEST_DROPPED = _HOP_BY_HOP | {"host", "expect", "forwarded", "x-forwarded-for", "x-forwarded-proto",
                                  "x-forwarded-host", "x-forwarded-port", "x-real-ip"}
#: request body chunks (one socket read each) queued per request between the client and the upstream,
#: and how many queued bytes are joined into one upstream write (fewer TLS records, fewer syscalls)
_BODY_QUEUE = 16
_COALESCE_BYTES = 1024 * 1024
OPERATOR_STATE_KEY = "silotune.operator"  # per-connection scope["state"] entry: the operator's name


# ------------------------------------------------------------------ policy
@dataclass(frozen=True)
class Decision:
    """What the gateway does with a request: forward it (status 0) or answer `status`."""

    status: int = 0
    reason: str = ""

    @property
    def forward(self) -> bool:
        return self.status == 0


def decide(role: str, method: str, path: str, raw_path: bytes | None = None) -> Decision:
    """The route policy of a listener with `role`, on the request line alone.

    Only exact, canonical paths pass: the raw path must be the decoded path
    (no percent-encoding), and it must match the role's route pattern
    (lowercase words and dashes under one prefix: no `..`, no `//`, no
    trailing slash).
    """
    if role not in ROLES:
        raise ValueError(f"unknown gateway role {role!r}")
    if raw_path is not None and raw_path != path.encode("utf-8", "surrogateescape"):
        return Decision(400, "percent-encoded paths are not accepted")
    if path == HEALTH_PATH:
        return Decision() if method in ("GET", "HEAD") else Decision(405, "GET or HEAD only")
    if _ALLOWED[role].fullmatch(path):
        return Decision() if method == "POST" else Decision(405, "POST only")
    if path.startswith(_FORBIDDEN[role]):
        if role == FLEET and path.startswith("/v1/control/"):
            return Decision(403, "the Control API is not served on this port: operators use the "
                                 "coordinator host or the operator listener with an operator certificate")
        return Decision(403, f"{path.split('/')[2]} API routes are not served on this port")
    return Decision(404, "no such route")


def _without(headers: Sequence[tuple[bytes, bytes]], dropped: frozenset[str]) -> list[tuple[bytes, bytes]]:
    """`headers` less `dropped` and less the headers the Connection header names (RFC 9110 7.6.1)."""
    named = {token.strip().lower() for key, value in headers if key.lower() == b"connection"
             for token in value.decode("latin-1").split(",")}
    return [(key, value) for key, value in headers
            if key.decode("latin-1").lower() not in dropped and key.decode("latin-1").lower() not in named]


def forward_headers(headers: Sequence[tuple[bytes, bytes]], client: tuple[str, int] | None,
                    scheme: str) -> list[tuple[bytes, bytes]]:
    """The request headers sent upstream: X-Forwarded-For/-Proto name the real peer."""
    out = _without(headers, _REQUEST_DROPPED)
    if client:
        out.append((b"x-forwarded-for", client[0].encode("latin-1")))
    out.append((b"x-forwarded-proto", scheme.encode("latin-1")))
    return out


def response_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers less the hop-by-hop ones (uvicorn frames the body itself)."""
    return _without(headers, _HOP_BY_HOP)


class _TooLarge(Exception):
    """The request body went over the cap while streaming."""


@dataclass
class _BodyState:
    received: int = 0
    too_large: bool = False


async def _reply(send: Any, status: int, reason: str) -> None:
    body = ('{"detail": "%s"}' % reason.replace('"', "'")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------ the ASGI app
class GatewayApp:
    """One listener's ASGI app: the route policy of `role`, then a streaming relay to `upstream`."""

    def __init__(self, role: str, upstream: str, *, upstream_ssl: ssl.SSLContext | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES, connect_timeout: float = 10.0) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown gateway role {role!r}")
        if max_request_bytes < 1:
            raise ValueError("max_request_bytes must be positive")
        self.role = role
        self.upstream = upstream.rstrip("/")
        self.upstream_ssl = upstream_ssl
        self.max_request_bytes = max_request_bytes
        self.connect_timeout = connect_timeout
        self._client: Any = None

    # -- lifecycle
    async def _open(self) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            verify=self.upstream_ssl if self.upstream_ssl is not None else False,
            timeout=httpx.Timeout(connect=self.connect_timeout, read=None, write=60.0, pool=60.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
            follow_redirects=False, trust_env=False,  # never an HTTP(S)_PROXY from the environment
        )
        self._client.headers = {}  # no default user-agent/accept-encoding: pass the client's own

    async def _close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await self._open()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self._close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if self._client is None:  # served without lifespan (tests)
            await self._open()
        method, path = scope["method"], scope["path"]
        client = scope.get("client")
        who = f"{client[0]}:{client[1]}" if client else "?"
        decision = decide(self.role, method, path, scope.get("raw_path"))
        operator = (scope.get("state") or {}).get(OPERATOR_STATE_KEY)
        if decision.forward and self.role == OPERATOR and not operator:
            # Unreachable while the handshake demands a certificate; kept as a second lock.
            decision = Decision(403, "an operator certificate is required")
        if not decision.forward:
            log.warning("%s: refused %s %s from %s: %d %s", self.role, method, path, who,
                        decision.status, decision.reason)
            await _reply(send, decision.status, decision.reason)
            return
        declared = _content_length(scope["headers"])
        if declared is None and any(k.lower() == b"content-length" for k, _ in scope["headers"]):
            await _reply(send, 400, "invalid Content-Length")
            return
        if declared is not None and declared > self.max_request_bytes:
            log.warning("%s: refused %s %s from %s: body of %d bytes over the %d-byte cap",
                        self.role, method, path, who, declared, self.max_request_bytes)
            await _reply(send, 413, f"request body over {self.max_request_bytes} bytes")
            return
        if self.role in (OPERATOR, TUNNEL):
            log.info("%s: %s %s from %s%s", self.role, method, path, who,
                     f" (operator {operator})" if operator else "")
        await self._relay(scope, receive, send, path)

    # -- relay
    async def _relay(self, scope: dict, receive: Any, send: Any, path: str) -> None:
        import anyio

        has_body = scope["method"] not in ("GET", "HEAD")
        tx, rx = anyio.create_memory_object_stream[bytes](max_buffer_size=_BODY_QUEUE)
        state = _BodyState()
        async with anyio.create_task_group() as group:
            group.start_soon(self._read_client, receive, tx, state, has_body, group.cancel_scope)
            try:
                await self._exchange(scope, send, path, rx, state, has_body)
            finally:
                group.cancel_scope.cancel()

    async def _read_client(self, receive: Any, tx: Any, state: _BodyState, has_body: bool,
                           scope: Any) -> None:
        """Feed the request body into `tx` (bounded), then wait for the client to go away."""
        async with tx:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    scope.cancel()  # the client left: stop talking to the upstream too
                    return
                chunk = message.get("body", b"")
                state.received += len(chunk)
                if state.received > self.max_request_bytes:
                    state.too_large = True
                    break
                if chunk and has_body:
                    await tx.send(chunk)
                if not message.get("more_body", False):
                    break
        while True:
            if (await receive())["type"] == "http.disconnect":
                scope.cancel()
                return

    async def _body(self, rx: Any, state: _BodyState) -> AsyncIterator[bytes]:
        """The request body as it arrives; chunks already queued are sent upstream as one write."""
        import anyio

        async with rx:
            async for chunk in rx:
                parts, size = [chunk], len(chunk)
                while size < _COALESCE_BYTES:
                    try:
                        part = rx.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    parts.append(part)
                    size += len(part)
                yield parts[0] if len(parts) == 1 else b"".join(parts)
        if state.too_large:
            raise _TooLarge()

    async def _exchange(self, scope: dict, send: Any, path: str, rx: Any, state: _BodyState,
                        has_body: bool) -> None:
        import anyio
        import httpx

        headers = forward_headers(scope["headers"], scope.get("client"), scope.get("scheme", "http"))
        request = self._client.build_request(
            scope["method"], self.upstream + path, headers=headers,
            content=self._body(rx, state) if has_body else None)
        try:
            response = await self._client.send(request, stream=True)
        except _TooLarge:
            await _reply(send, 413, f"request body over {self.max_request_bytes} bytes")
            return
        except httpx.TimeoutException:
            await _reply(send, 504, "the SuperLink did not answer in time")
            return
        except httpx.HTTPError as err:
            if state.too_large:
                await _reply(send, 413, f"request body over {self.max_request_bytes} bytes")
                return
            log.error("%s: upstream %s failed: %s: %s", self.role, path, type(err).__name__, err)
            await _reply(send, 502, "the SuperLink is not reachable")
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": response_headers(response.headers.raw)})
            async for chunk in response.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    values = [v for k, v in headers if k.lower() == b"content-length"]
    if not values:
        return None
    try:
        lengths = {int(v) for v in values}
    except ValueError:
        return None
    if len(lengths) != 1 or min(lengths) < 0:
        return None
    return lengths.pop()


# ------------------------------------------------------------------ TLS
class ServerTls(Protocol):
    """The coordinator's TLS files (server.pki.ServerFiles is one)."""

    ca_cert: Path
    cert: Path
    key: Path


def server_context(cert: Path | str, key: Path | str, client_ca: Path | str | None = None) -> ssl.SSLContext:
    """The listener's TLS context; with `client_ca`, a client certificate from that CA is required.

    On the server side OpenSSL checks a client certificate for the
    "SSL client" purpose: an extendedKeyUsage without clientAuth (the
    coordinator's own server certificate) fails the handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca_cert: Path | str, cert: Path | str | None = None,
                   key: Path | str | None = None) -> ssl.SSLContext:
    """A TLS client context trusting `ca_cert` only; with `cert`/`key`, presenting that client certificate."""
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


def _identity_protocol(base: type, ca_cert: Path | str) -> type:
    """A uvicorn HTTP protocol class that records the verified operator of each TLS connection.

    asyncio calls `connection_made` after the handshake, so the peer's
    certificate (already verified by OpenSSL against the CA) is there; it is
    checked again (server.pki.operator_name: chain, validity, clientAuth,
    OU=operator) and the name goes into this connection's scope["state"].
    """
    from cryptography import x509

    from runtime.keys import PkiError, load_ca
    from server.pki import operator_name

    ca = load_ca(ca_cert)

    class OperatorIdentityProtocol(base):  # type: ignore[valid-type, misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            name = None
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der:
                try:
                    name = operator_name(ca, x509.load_der_x509_certificate(der))
                except (PkiError, ValueError) as err:
                    log.warning("operator: refused certificate from %s: %s", self.client, err)
            self.app_state = {**self.app_state, OPERATOR_STATE_KEY: name}

    return OperatorIdentityProtocol


def _http_protocol() -> type:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is installed with uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


# ------------------------------------------------------------------ the process
@dataclass(frozen=True)
class Listener:
    """One public socket of the gateway and the role that fixes what it forwards."""

    role: str
    host: str
    port: int

    @property
    def dial_host(self) -> str:
        return dial_host(self.host)

    @property
    def address(self) -> str:
        """host:port as dialled from this machine (loopback for a bind-all host)."""
        return dial_address(self.host, self.port)

    def spec(self) -> str:
        return f"{self.role}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Listener:
        role, sep, rest = text.partition("@")
        host, _, port = rest.rpartition(":")
        if not sep or role not in ROLES or not host or not port.isdigit():
            raise ValueError(f"listener {text!r}: expected ROLE@HOST:PORT with ROLE in {ROLES}")
        return cls(role, host.strip("[]"), int(port))


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn.Server without its own signal handlers: `serve` stops every listener together."""

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def, override]
            yield

    return Server


def build_servers(listeners: Sequence[Listener], upstream: str, *, tls: ServerTls | None = None,
                  upstream_ca: Path | str | None = None, upstream_cert: Path | str | None = None,
                  upstream_key: Path | str | None = None,
                  max_request_bytes: int = MAX_REQUEST_BYTES) -> list[Any]:
    """One uvicorn server per listener (not started)."""
    import uvicorn

    if upstream.startswith("https://") and upstream_ca is None:
        raise ValueError("an https upstream needs upstream_ca (the CA that signed its certificate)")
    upstream_ssl = client_context(upstream_ca, upstream_cert, upstream_key) if upstream_ca else None
    server_class = _server_class()
    servers = []
    for listener in listeners:
        app = GatewayApp(listener.role, upstream, upstream_ssl=upstream_ssl,
                         max_request_bytes=max_request_bytes)
        protocol = _http_protocol()
        factory = None
        if listener.role == OPERATOR:
            if tls is None:
                raise ValueError("the operator listener needs TLS (the coordinator's certificate and CA)")
            protocol = _identity_protocol(protocol, tls.ca_cert)
            context = server_context(tls.cert, tls.key, client_ca=tls.ca_cert)
            factory = lambda _config, _default, ctx=context: ctx  # noqa: E731
        elif listener.role == FLEET and tls is not None:
            context = server_context(tls.cert, tls.key)
            factory = lambda _config, _default, ctx=context: ctx  # noqa: E731
        elif listener.role == TUNNEL and listener.host not in (LOCALHOST, "::1"):
            raise ValueError("a tunnel listens on 127.0.0.1 only (it is plain HTTP)")
        config = uvicorn.Config(
            app, host=listener.host, port=listener.port, http=protocol, ws="none", lifespan="on", interface="asgi3",
            access_log=False, server_header=False, date_header=False, proxy_headers=False,
            log_config=None, ssl_context_factory=factory, timeout_graceful_shutdown=3,
            timeout_keep_alive=30, limit_concurrency=1000)
        servers.append(server_class(config))
    return servers


async def serve(servers: Sequence[Any]) -> None:
    """Run the servers until SIGTERM/SIGINT or until one of them stops; then stop them all."""
    import signal

    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.ensure_future(server.serve()) for server in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    stop()
    await asyncio.gather(*tasks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, help="http(s)://127.0.0.1:PORT of the SuperLink")
    parser.add_argument("--upstream-ca", help="CA certificate the upstream's certificate chains to")
    parser.add_argument("--upstream-cert", help="client certificate to present upstream (tunnel)")
    parser.add_argument("--upstream-key", help="its private key")
    parser.add_argument("--listen", action="append", required=True, metavar="ROLE@HOST:PORT")
    parser.add_argument("--ca-cert", help="federation CA (operator listener: client certificates)")
    parser.add_argument("--cert", help="the listeners' TLS certificate")
    parser.add_argument("--key", help="its private key")
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded request
    tls = None
    if args.cert or args.key:
        if not (args.cert and args.key and args.ca_cert):
            parser.error("--cert, --key and --ca-cert go together")
        tls = _Tls(Path(args.ca_cert), Path(args.cert), Path(args.key))
    listeners = [Listener.parse(text) for text in args.listen]
    servers = build_servers(listeners, args.upstream, tls=tls, upstream_ca=args.upstream_ca,
                            upstream_cert=args.upstream_cert, upstream_key=args.upstream_key,
                            max_request_bytes=args.max_request_bytes)
    for listener in listeners:
        log.info("%s listener on %s:%d (%s) -> %s", listener.role, listener.host, listener.port,
                 "mutual TLS" if listener.role == OPERATOR else "TLS" if tls and listener.role == FLEET
                 else "plain HTTP", args.upstream)
    run(serve(servers))
    return 0


def run(main_coroutine: Any) -> None:
    """Run the gateway's event loop: uvloop when installed (uvicorn[standard] brings it), else asyncio."""
    if os.environ.get("SILOTUNE_GATEWAY_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            uvloop = None
        if uvloop is not None:
            uvloop.run(main_coroutine)
            return
    asyncio.run(main_coroutine)


@dataclass(frozen=True)
class _Tls:
    ca_cert: Path
    cert: Path
    key: Path


class GatewayProcess(ManagedProcess):
    """`python -m server.gateway` as a child process, stopped by PID like the Flower processes.

    Its log is `state_dir/gateway.log` (refusals, operator calls with the
    operator's name, upstream failures).
    """

    what = "gateway"

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Listener] = []

    def start(self, state_dir: Path | str, upstream: str, listeners: Sequence[Listener], *,
              tls: ServerTls | None = None, upstream_ca: Path | str | None = None,
              upstream_cert: Path | str | None = None, upstream_key: Path | str | None = None,
              max_request_bytes: int = MAX_REQUEST_BYTES, timeout: float = 60.0,
              log_name: str = "gateway.log") -> GatewayProcess:
        """Launch the gateway; return once every listener accepts connections.

        `upstream`: `https://127.0.0.1:PORT` (or http:// for an insecure
        SuperLink). A listener with port 0 gets a free port.
        """
        if self.proc is not None:
            raise RuntimeError("gateway already started")
        if not listeners:
            raise ValueError("the gateway needs at least one listener")
        if tls is None and any(item.role == OPERATOR for item in listeners):
            raise ValueError("the operator listener needs tls= (mutual TLS with operator certificates)")
        self.listeners = [Listener(item.role, item.host, item.port or
                                   free_port(dial_host(item.host)))
                          for item in listeners]
        state_dir = Path(state_dir).resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = state_dir / log_name
        cmd = [sys.executable, "-m", "server.gateway", "--upstream", upstream,
               "--max-request-bytes", str(max_request_bytes)]
        for listener in self.listeners:
            cmd += ["--listen", listener.spec()]
        if tls is not None:
            cmd += ["--ca-cert", str(Path(tls.ca_cert).resolve()), "--cert", str(Path(tls.cert).resolve()),
                    "--key", str(Path(tls.key).resolve())]
        for flag, value in (("--upstream-ca", upstream_ca), ("--upstream-cert", upstream_cert),
                            ("--upstream-key", upstream_key)):
            if value is not None:
                cmd += [flag, str(Path(value).resolve())]
        env = {**os.environ, TAG_ENV: self.tag, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=state_dir)
        try:
            for listener in self.listeners:
                wait_for_port(listener.dial_host, listener.port, timeout, proc=self.proc,
                              log_path=self.log_path, what="gateway")
        except BaseException:
            self.stop()
            raise
        return self

    def listener(self, role: str) -> Listener | None:
        return next((item for item in self.listeners if item.role == role), None)


if __name__ == "__main__":
    sys.exit(main())
