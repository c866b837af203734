"""The SuperLink's HTTP middleware, each run only for the requests it acts on (its process only).

Why: Flower 1.41's SuperLink (`flwr/superlink/main.py` `_get_middleware`) wraps
every request, whatever its API, in nine Starlette `BaseHTTPMiddleware` layers.
Six of them act on one API only and hand every other request straight on:
four on the Control API (`/v1/control/`: sensitive-response headers, account
authentication, license, event log), node authentication on the Fleet API
(`/v1/fleet/`), the Fleet event log only with an event-log plugin, and the
Runtime tracing only with `FLWR_TRACING_ENABLED=1`. Handing on is not free:
each layer runs the request in a task of its own and relays the response's
messages through memory streams, and a deployed round is hundreds of
small object requests (benchmarks/RESULTS.md, "Deployment overhead, the SuperLink
paced and small messages inline").

`scope_middleware` keeps Flower's list and order and wraps each of those six
in `Scoped`, a plain ASGI layer that sends a request outside the middleware's
scope to the next layer directly and every other request through the
middleware, unchanged. The scopes are read off Flower's code (each one's
`dispatch` starts with the same test and calls `call_next` when it fails), and
`scope_middleware` refuses to start (`FlowerPacingUnsupported`) unless the
installed Flower's list is exactly the one they were read from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from typing import Any

from starlette.datastructures import URL

from runtime.flower_backoff import FlowerPacingUnsupported
from server.linkstate_pacing import FLOWER_ORIGINAL, flower_original

Scope = MutableMapping[str, Any]
ASGIApp = Callable[..., Any]

CONTROL_PREFIX = "/v1/control/"
FLEET_PREFIX = "/v1/fleet/"
_PATH_KEY = "silotune.url_path"


def _url_path(scope: Scope) -> str:
    """The path Flower's middleware tests (`request.url.path`), parsed as Starlette parses it, once
    per request (kept in the scope, which every layer shares)."""
    path = scope.get(_PATH_KEY)
    if path is None:
        path = scope[_PATH_KEY] = URL(scope=scope).path
    return path


def _control(scope: Scope) -> bool:
    return _url_path(scope).startswith(CONTROL_PREFIX)


def _fleet(scope: Scope) -> bool:
    return _url_path(scope).startswith(FLEET_PREFIX)


def _fleet_event_log(scope: Scope) -> bool:
    app = scope.get("app")
    return _fleet(scope) and getattr(getattr(app, "state", None), "fleet_event_log_plugin", None) is not None


def _tracing(scope: Scope) -> bool:
    return os.getenv("FLWR_TRACING_ENABLED") == "1"  # read per request, as Flower's middleware reads it


#: Flower 1.41's SuperLink middleware, outermost first, and for the ones scoped here the test of
#: whether a request is theirs (None: every request)
FLOWER_MIDDLEWARE: tuple[tuple[str, Callable[[Scope], bool] | None], ...] = (
    ("ControlSensitiveResponseMiddleware", _control),
    ("BaseHTTPMiddleware", None),  # http_error_translator: FlowerError → HTTP answer, every API
    ("ControlAuthenticationMiddleware", _control),
    ("ControlLicenseMiddleware", _control),
    ("ProtobufTranslationMiddleware", None),  # every protobuf route
    ("RuntimeTracingMiddleware", _tracing),
    ("ControlEventLogMiddleware", _control),
    ("NodeAuthMiddleware", _fleet),
    ("FleetEventLogMiddleware", _fleet_event_log),
)


class Scoped:
    """An ASGI middleware run only for the requests `applies` selects; others skip it."""

    def __init__(self, app: ASGIApp, *, middleware: type, applies: Callable[[Scope], bool],
                 args: tuple = (), kwargs: dict[str, Any] | None = None) -> None:
        self.app = app
        self.middleware = middleware(app, *args, **(kwargs or {}))
        self.applies = applies

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and not self.applies(scope):
            await self.app(scope, receive, send)
        else:
            await self.middleware(scope, receive, send)


def _check_sensitive_routes() -> None:
    """ControlSensitiveResponseMiddleware acts on CONTROL_SENSITIVE_ROUTE_KEYS: all Control routes?"""
    from flwr.superlink.routers.control import middlewares  # pylint: disable=import-outside-toplevel

    routes = getattr(middlewares, "CONTROL_SENSITIVE_ROUTE_KEYS", None)
    if routes is None or not all(path.startswith(CONTROL_PREFIX) for _, path in routes):
        raise FlowerPacingUnsupported("Flower's sensitive Control routes are not all under /v1/control/: "
                                      "check the installed Flower (server/superlink_middleware.py)")


def _names(listed: list) -> tuple[str, ...]:
    return tuple(getattr(item.cls, "__name__", repr(item.cls)) for item in listed)


def scope_middleware() -> None:
    """Flower's SuperLink app, built after this call in this process, runs each Control-, Fleet- or
    tracing-only middleware for its requests only (module doc)."""
    from starlette.middleware import Middleware  # pylint: disable=import-outside-toplevel
    from flwr.superlink import main as superlink_main  # pylint: disable=import-outside-toplevel

    flower_list = flower_original(superlink_main._get_middleware)
    names = _names(flower_list())
    if names != tuple(name for name, _ in FLOWER_MIDDLEWARE):
        raise FlowerPacingUnsupported(f"the SuperLink's middleware is {names}, not the Flower 1.41 list this "
                                      "scoping was written for (server/superlink_middleware.py)")
    _check_sensitive_routes()

    def scoped_list() -> list:
        out = []
        current = flower_list()  # asked again when the app is built: the same list, checked again
        if _names(current) != names:
            raise FlowerPacingUnsupported(f"the SuperLink's middleware changed to {current} after it was checked")
        for item, (_, applies) in zip(current, FLOWER_MIDDLEWARE, strict=True):
            out.append(item if applies is None else
                       Middleware(Scoped, middleware=item.cls, applies=applies, args=tuple(item.args),
                                  kwargs=dict(item.kwargs)))
        return out

    setattr(scoped_list, FLOWER_ORIGINAL, flower_list)
    superlink_main._get_middleware = scoped_list
