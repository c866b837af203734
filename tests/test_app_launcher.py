"""The app launcher's warm runners (clients/app_launcher.py): routing by bundle hash, and a runner's
task executor — every bundle verified before use (a verified one remembered by its bytes' sha256),
its app installed and loaded once, a bundle that is not the runner's refused before anything of it
is used. The deployment itself: tests/test_app_runner_deployment.py."""

from __future__ import annotations

import hashlib
import io
import sys
import types
import zipfile
from pathlib import Path

import pytest

from clients import app_launcher, app_task
from runtime import app_signature as sig
from runtime.app_signature import build_fab, create_publisher_key, sign_app
from test_app_signature import rezip, write_app

RUN = types.SimpleNamespace(fab_id="silotune/sigprobe", fab_version="1.0.0")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> sig.PublisherKeyFiles:
    return create_publisher_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def signed_fab(tmp_path: Path, keys: sig.PublisherKeyFiles) -> bytes:
    app = write_app(tmp_path / "src")
    sign_app(app, keys.private_key)
    return build_fab(app)


@pytest.fixture
def executor(keys: sig.PublisherKeyFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    import flwr.supernode.runtime.run_clientapp as run_clientapp

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    pull = "pull_and_inflate_object_from_tree"
    monkeypatch.setattr(run_clientapp, pull, getattr(run_clientapp, pull))  # an executor shortens its backoff
    made = []

    def make(only_sha256: str | None = None, key: Path | None = keys.public_key) -> app_task.TaskExecutor:
        made.append(app_task.TaskExecutor("127.0.0.1:9", key, only_sha256))
        checks = made[-1].checks = []  # type: ignore[attr-defined]
        verify = made[-1].verify_fab
        made[-1].verify_fab = lambda fab, key: checks.append(hashlib.sha256(fab).hexdigest()) or verify(fab, key)
        return made[-1]

    yield make
    app_task.forget_modules({"sigprobe"})
    sys.path[:] = [p for p in sys.path if str(tmp_path) not in p]


def log(*args: object) -> None:
    pass


def with_comment(fab: bytes) -> bytes:
    buffer = io.BytesIO(fab)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.comment = b"other bytes"
    return buffer.getvalue()


def installed(tmp_path: Path) -> list[str]:
    folder = tmp_path / "flwr-home" / app_task.INSTALL_DIR
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------ the executor
def test_a_runner_verifies_installs_and_loads_its_app_once_and_reverifies_other_bytes(
        executor, signed_fab: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import flwr.cli.install

    digest = hashlib.sha256(signed_fab).hexdigest()
    installs = []
    real_install = flwr.cli.install.install_from_fab
    monkeypatch.setattr(flwr.cli.install, "install_from_fab",
                        lambda *a, **k: installs.append(1) or real_install(*a, **k))
    runner = executor()
    first = runner._app(signed_fab, RUN, log)
    assert type(first).__name__ == "ClientApp" and runner.checks == [digest] and len(installs) == 1
    assert installed(tmp_path) == [digest]
    assert Path(sys.modules["sigprobe.client_app"].__file__).is_relative_to(tmp_path / "flwr-home")
    # the next task of the same bundle: the same ClientApp, no second check nor install
    assert runner._app(signed_fab, RUN, log) is first and runner.checks == [digest] and len(installs) == 1
    # other bytes are checked again: a modified file is refused, though a bundle was verified before
    tampered = rezip(signed_fab, change={"sigprobe/client_app.py": b"import os\nLEAK = 1\n"})
    with pytest.raises(sig.AppFileModified, match="file sigprobe/client_app.py modified"):
        runner._app(tampered, RUN, log)
    assert runner.checks == [digest, hashlib.sha256(tampered).hexdigest()] and len(installs) == 1
    # a signed bundle other than the loaded one never replaces it in this process
    other = with_comment(signed_fab)  # same files, other zip bytes: another hash, and still validly signed
    assert hashlib.sha256(other).hexdigest() != digest
    with pytest.raises(app_task.WrongApp, match="is loaded here"):
        runner._app(other, RUN, log)
    assert len(installs) == 1 and installed(tmp_path) == [digest]


def test_a_runner_refuses_a_bundle_that_is_not_its_own_before_checking_or_installing_it(
        executor, signed_fab: bytes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runner = executor(only_sha256="0" * 64)
    with pytest.raises(app_task.WrongApp, match="this runner serves app 0000000000000000"):
        runner._app(signed_fab, RUN, log)
    assert runner.checks == [] and runner.loaded is None and installed(tmp_path) == []
    assert "sigprobe" not in sys.modules


def test_an_unsigned_bundle_is_refused_and_nothing_is_remembered(
        executor, signed_fab: bytes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    unsigned = rezip(signed_fab, change={sig.SIGNATURE_FILE: None})
    runner = executor(only_sha256=hashlib.sha256(unsigned).hexdigest())
    for _ in range(2):  # a refusal is not cached as anything: checked again, refused again
        with pytest.raises(sig.AppUnsigned, match="unsigned app"):
            runner._app(unsigned, RUN, log)
    assert len(runner.checks) == 2 and runner.verified == set() and runner.loaded is None
    assert installed(tmp_path) == [] and "sigprobe" not in sys.modules


# ------------------------------------------------------------------ the launcher's runners
ECHO = r"""
import sys, os
out = sys.argv[1]
for line in iter(sys.stdin.readline, ""):
    with open(out, "a") as f:
        f.write(f"{os.getpid()} {line.strip()}\n")
"""


def test_tasks_go_to_their_apps_runner_one_process_per_app_at_most_two(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log_file = tmp_path / "tokens"
    calls = []

    def fake_command(mode: str, address: str, **kw: object) -> list[str]:
        calls.append((mode, kw["app_sha256"]))
        return [sys.executable, "-c", ECHO, str(log_file)]

    monkeypatch.setattr(app_launcher, "command", fake_command)
    runners = app_launcher.Runners("127.0.0.1:9", None, limit=2)
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    try:
        first = runners.hand(a, "t1")
        assert runners.hand(a, "t2") is first  # the same app: the same process
        second = runners.hand(b, "t3")
        assert second is not first
        runners.hand(a, "t4")  # a is now the most recently used: c evicts b
        third = runners.hand(c, "t5")
        assert second.wait(timeout=30) == 0  # its input closed: it finished its task and left
        assert set(runners.procs) == {a, c} and runners.procs[c] is third
        first.stdin.close()  # type: ignore[union-attr]
        first.wait(timeout=30)
        assert runners.hand(a, "t6") is not first  # a runner that left is replaced
        assert calls == [(app_launcher.RUNNER, x) for x in (a, b, c, a)]
        with pytest.raises(ValueError, match="not a FAB sha256"):
            runners.hand("../x", "t7")
    finally:
        procs = [*runners.procs.values(), *runners.retired]
        runners.close()
        for proc in procs:
            proc.wait(timeout=30)
    seen = {}
    for line in log_file.read_text().splitlines():
        pid, token = line.split()
        seen[token] = int(pid)
    assert seen["t1"] == seen["t2"] == seen["t4"] == first.pid and seen["t3"] == second.pid
    assert seen["t5"] == third.pid and seen["t6"] not in (first.pid, second.pid, third.pid)


def test_command_lines_and_arguments() -> None:
    cmd = app_launcher.command(app_launcher.RUNNER, "127.0.0.1:9", publisher_key=None, parent_pid=7,
                               app_sha256="f" * 64)
    assert "flwr-clientapp-runner" in cmd and cmd[cmd.index("--app-sha256") + 1] == "f" * 64
    serve = app_launcher.command(app_launcher.SERVE, "127.0.0.1:9", publisher_key=None, warm_runner=True,
                                 poll_interval=0.1)
    assert "--warm-runner" in serve and serve[serve.index("--poll-interval") + 1] == "0.1"
    base = ["--runtime-api-address", "127.0.0.1:9", "--unsigned-apps"]
    for bad in (["flwr-clientapp-runner", *base], ["flwr-clientapp-runner", *base, "--app-sha256", "F" * 64],
                ["flwr-clientapp", *base, "--app-sha256", "f" * 64], ["serve", *base, "--poll-interval", "0"]):
        with pytest.raises(SystemExit):
            app_launcher.main(bad)
