"""The SuperLink silotune starts (server/superlink_main.py): its middleware scoped to the requests
each one acts on (server/superlink_middleware.py), a refusal where Flower's list is not the one the
scopes were read from, and a real paced SuperLink that serves and still authenticates Fleet calls."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from flwr.proto.message_pb2 import PullObjectRequest  # type: ignore[attr-defined]
from flwr.proto.node_pb2 import Node  # type: ignore[attr-defined]
from flwr.superlink import main as flower_superlink_main
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from runtime.flower_processes import alive, tagged
from server import superlink_middleware
from server.linkstate_pacing import FlowerPacingUnsupported
from server.superlink import SuperLinkProcess
from server.superlink_middleware import FLOWER_MIDDLEWARE, Scoped

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flower_superlink_main, "_get_middleware", flower_superlink_main._get_middleware)


def test_only_the_api_only_middleware_is_scoped_in_flowers_order(restore_flower: None) -> None:
    flower = flower_superlink_main._get_middleware()
    superlink_middleware.scope_middleware()
    superlink_middleware.scope_middleware()  # twice: wraps Flower's list once, not its own
    paced = flower_superlink_main._get_middleware()
    assert len(paced) == len(flower) == len(FLOWER_MIDDLEWARE)
    for before, after, (name, applies) in zip(flower, paced, FLOWER_MIDDLEWARE):
        assert before.cls.__name__ == name
        if applies is None:
            assert after.cls is before.cls and after.kwargs == before.kwargs
        else:
            assert after.cls is Scoped and after.kwargs["middleware"] is before.cls
            assert after.kwargs["applies"] is applies
    scoped = {name for name, applies in FLOWER_MIDDLEWARE if applies is not None}
    assert {"NodeAuthMiddleware", "ControlAuthenticationMiddleware"} <= scoped
    assert not {"ProtobufTranslationMiddleware", "BaseHTTPMiddleware"} & scoped


def test_a_flower_with_other_middleware_is_refused(restore_flower: None, monkeypatch: pytest.MonkeyPatch) -> None:
    listed = flower_superlink_main._get_middleware()
    monkeypatch.setattr(flower_superlink_main, "_get_middleware", lambda: [*listed, Middleware(BaseHTTPMiddleware)])
    with pytest.raises(FlowerPacingUnsupported, match="middleware"):
        superlink_middleware.scope_middleware()
    monkeypatch.setattr(flower_superlink_main, "_get_middleware", lambda: listed[:-1])
    with pytest.raises(FlowerPacingUnsupported, match="middleware"):
        superlink_middleware.scope_middleware()


def app_with(seen: list[str], applies) -> Starlette:  # type: ignore[no-untyped-def]
    class Recording(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):  # type: ignore[no-untyped-def]
            seen.append(request.url.path)
            response = await call_next(request)
            response.headers["x-recorded"] = "1"
            return response

    async def echo(request):  # type: ignore[no-untyped-def]
        return PlainTextResponse(request.url.path)

    return Starlette(routes=[Route("/v1/{api}/{name}", echo, methods=["GET", "POST"])],
                     middleware=[Middleware(Scoped, middleware=Recording, applies=applies)])


@pytest.mark.parametrize("applies, recorded", [(superlink_middleware._control, "/v1/control/list-runs"),
                                               (superlink_middleware._fleet, "/v1/fleet/pull-object")])
def test_a_scoped_middleware_runs_for_its_api_and_is_skipped_by_the_others(applies, recorded: str) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    with TestClient(app_with(seen, applies)) as client:
        for path in ("/v1/control/list-runs", "/v1/fleet/pull-object", "/v1/runtime/pull-messages"):
            answer = client.post(path)
            assert answer.status_code == 200 and answer.text == path  # the route answers either way
            assert ("x-recorded" in answer.headers) == (path == recorded)
    assert seen == [recorded]


def test_tracing_middleware_runs_only_when_flower_tracing_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    with TestClient(app_with(seen, superlink_middleware._tracing)) as client:
        client.post("/v1/runtime/pull-messages")
        monkeypatch.setenv("FLWR_TRACING_ENABLED", "1")
        client.post("/v1/runtime/push-messages")
    assert seen == ["/v1/runtime/push-messages"]


def test_entry_point_hands_flowers_arguments_to_flower_superlink() -> None:
    result = subprocess.run([sys.executable, "-P", "-m", "server.superlink_main",
                             "--status-cleanup-interval", "2", "--", "--help"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: flower-superlink") and "--database" in result.stdout


def test_the_coordinators_superlink_runs_paced_serves_and_still_authenticates_nodes(tmp_path: Path) -> None:
    link = SuperLinkProcess().start(tmp_path / "link")
    pids: list[int] = []
    try:
        cmdline = Path(f"/proc/{link.pid}/cmdline").read_bytes().split(b"\0")
        assert b"server.superlink_main" in cmdline and b"--database" in cmdline
        with urllib.request.urlopen(f"http://{link.address}/health", timeout=30) as answer:
            assert answer.status == 200
        assert link.list_nodes() == []  # the Control API (`flwr supernode list`), through its middleware
        unsigned = PullObjectRequest(node=Node(node_id=1), run_id=1, object_id="0" * 64).SerializeToString()
        request = urllib.request.Request(f"http://{link.address}/v1/fleet/pull-object", data=unsigned,
                                         headers={"Content-Type": "application/protobuf"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:  # node authentication still runs on Fleet calls
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401
    finally:
        pids = link.stop()
    assert pids and alive(pids) == [] and not tagged(link.tag)


@pytest.mark.parametrize("path", ["/v1/control/list-runs", "/v1/fleet/pull-object", "/v1/fleet/x?y#z",
                                  "//v1/control/list-runs", "/v1/fleetx", "/health"])
def test_a_scope_is_decided_on_the_path_flowers_middleware_reads(path: str) -> None:
    from starlette.requests import Request

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"", "scheme": "http",
             "server": ("127.0.0.1", 9093), "headers": [(b"host", b"127.0.0.1:9093")]}
    flower_path = Request(scope).url.path
    assert superlink_middleware._control(dict(scope)) == flower_path.startswith("/v1/control/")
    assert superlink_middleware._fleet(dict(scope)) == flower_path.startswith("/v1/fleet/")


def test_a_list_that_changes_after_the_check_is_refused_when_the_app_is_built(restore_flower: None,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    listed = list(flower_superlink_main._get_middleware())
    monkeypatch.setattr(flower_superlink_main, "_get_middleware", lambda: list(listed))
    superlink_middleware.scope_middleware()
    listed.insert(0, Middleware(BaseHTTPMiddleware))  # a scope would shift onto the wrong layer
    with pytest.raises(FlowerPacingUnsupported, match="changed"):
        flower_superlink_main._get_middleware()
