"""The dashboard's listener: uvicorn in a thread of the coordinator, stopped with ``stop()``.

Two ways to serve it, nothing in between:

- **with TLS** (``tls=``, the coordinator's ``server.pki.ServerFiles``): mutual TLS, as the
  gateway's operator listener (server/gateway.py). The handshake demands a client certificate
  that chains to the federation's CA and is fit for client authentication
  (``ssl.CERT_REQUIRED``; OpenSSL's purpose check refuses the coordinator's own server
  certificate, EKU serverAuth); each connection's certificate is then checked again by
  server.pki.operator_name (OU=operator, SAN urn:silotune:operator:NAME), and a request on a
  connection without an operator is refused with 403 (server/dashboard/app.py, OperatorOnly).
  What an organization holds opens neither: its node key is an OpenSSH key that no CA signed
  (a self-signed certificate made with it fails the chain), and ca.pem has no key.
- **without TLS**: plain HTTP on 127.0.0.1 only, for the coordinator host itself (or through
  an SSH tunnel); any other address is refused, and so is a request for another Host.

A thread rather than a process: the dashboard only reads files, and the coordinator's process
already holds the state directory. ``port=0`` takes a free port: the socket is bound here,
before the thread starts, so ``.port`` is the real one as soon as ``start()`` returns.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn

from server.dashboard.app import dashboard_app
from server.gateway import ServerTls, _http_protocol, _identity_protocol, server_context

log = logging.getLogger("silotune.dashboard")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOOPBACK_HOST_HEADERS = ("127.0.0.1", "localhost", "[::1]", "::1")


class DashboardServer:
    """The dashboard on ``host:port`` (see the module docstring)."""

    def __init__(self, state_dir: Path, host: str = "127.0.0.1", port: int = 0, tls: ServerTls | None = None) -> None:
        if tls is None and host not in LOOPBACK:
            raise ValueError(f"the dashboard without TLS listens on 127.0.0.1 only, not {host!r}: "
                             "give it the coordinator's TLS files (operators then need an operator certificate)")
        self.state_dir = Path(state_dir)
        self.host = host
        self.port = port
        self.tls = tls
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    def start(self, timeout: float = 30.0) -> DashboardServer:
        """Serve; return once the listener accepts connections."""
        if self._thread is not None:
            raise RuntimeError("dashboard already started")
        app = dashboard_app(self.state_dir, require_operator=self.tls is not None,
                            allowed_hosts=None if self.tls is not None else LOOPBACK_HOST_HEADERS)
        protocol = _http_protocol()
        factory = None
        if self.tls is not None:
            protocol = _identity_protocol(protocol, self.tls.ca_cert)
            context = server_context(self.tls.cert, self.tls.key, client_ca=self.tls.ca_cert)
            factory = lambda _config, _default, ctx=context: ctx  # noqa: E731
        config = uvicorn.Config(
            app, host=self.host, port=self.port, http=protocol, ws="none", lifespan="off", interface="asgi3",
            access_log=False, server_header=False, log_config=None, ssl_context_factory=factory,
            timeout_graceful_shutdown=2, limit_concurrency=200)
        self._socket = _bind(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the dashboard did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        log.info("dashboard on %s (%s)", self.url,
                 "mutual TLS, operator certificates" if self.tls is not None else "loopback only, plain HTTP")
        return self

    def _serve(self) -> None:
        assert self._server is not None and self._socket is not None
        asyncio.run(self._server.serve(sockets=[self._socket]))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait for the thread to end."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here (not by uvicorn, which exits the process when a port is taken)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
