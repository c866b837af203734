"""The operator's dashboard: a read-only web page over the coordinator's state directory.

``dashboard_app(state_dir)`` is a Starlette (ASGI) application:

    GET /                    the page (static/index.html, dashboard.js, Chart.js vendored in static/vendor/)
    GET /api/jobs            every job: state, specialist, current round, ε
    GET /api/jobs/{id}       one job: its rounds (sampled, accepted, rejected with reasons, train loss,
                             each organization's evaluation), its per-organization learning curves
    GET /api/specialists     the registered specialists
    GET /static/...          the page's script, style sheet and Chart.js

Nothing else: there is no route that changes anything (a POST, PUT or DELETE gets 405), and
the reads never write (server/dashboard/data.py opens the SQLite files read-only).

Who may read it is decided in front of this app (server/dashboard/server.py): with TLS, only
a client holding an operator certificate completes the handshake, and ``require_operator``
refuses any request whose connection did not present one that server.pki.operator_name
accepted; without TLS the server listens on loopback only and ``allowed_hosts`` refuses
requests for any other Host (a web page elsewhere cannot reach it by DNS rebinding).

Organization names, details and reasons came from the network: they leave here as JSON
strings, and the page inserts them with ``textContent`` only. The Content-Security-Policy
allows scripts from this server alone, so a string that did end up as markup could not run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server.dashboard.data import DashboardData
from server.gateway import OPERATOR_STATE_KEY

STATIC = Path(__file__).resolve().parent / "static"
REFRESH_SECONDS = 2.0   # the page polls the API this often (dashboard.js reads it from the page)

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class OperatorOnly:
    """Refuses (403) every HTTP request whose TLS connection did not present an operator certificate.

    The server's connection protocol (server.gateway's identity protocol) checks the peer's
    certificate once per connection and leaves the operator's name in ``scope["state"]``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not (scope.get("state") or {}).get(OPERATOR_STATE_KEY):
            await PlainTextResponse("an operator certificate is required", status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                message["headers"] = [h for h in message.get("headers", []) if h[0].lower() not in names] + \
                    SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)


def dashboard_app(state_dir: Path, *, require_operator: bool = False,
                  allowed_hosts: Sequence[str] | None = None) -> Starlette:
    """The dashboard over ``state_dir`` (see the module docstring)."""
    data = DashboardData(Path(state_dir))

    def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    def jobs(request: Request) -> Response:
        return JSONResponse({"jobs": data.jobs(), "refresh_seconds": REFRESH_SECONDS})

    def job(request: Request) -> Response:
        found = data.job(request.path_params["job_id"])
        if found is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        return JSONResponse(found)

    def specialists(request: Request) -> Response:
        return JSONResponse({"specialists": data.specialists()})

    middleware = [Middleware(SecurityHeaders)]
    if require_operator:
        middleware.append(Middleware(OperatorOnly))
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    routes = [
        Route("/", page, methods=["GET"]),
        Route("/api/jobs", jobs, methods=["GET"]),
        Route("/api/jobs/{job_id:str}", job, methods=["GET"]),
        Route("/api/specialists", specialists, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=middleware)
