"""The federation's app signature (runtime/app_signature.py): keys, the manifest, signing, verifying,
and every way a bundle is refused; the `silotune` commands around it. Fast: no Flower process.

The bundles here are built by Flower's own builder (`flwr.cli.build.build_fab_from_disk`, what
`flwr run` sends), so the manifest is checked against exactly what an agent receives.
"""

from __future__ import annotations

import base64
import io
import json
import re
import stat
import sys
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from clients import app_launcher, app_task
from runtime import app_signature as sig
from runtime.app_signature import (
    SIGNATURE_FILE,
    AppBundleInvalid,
    AppFileMissing,
    AppFileModified,
    AppFileUnsigned,
    AppRejected,
    AppSignatureInvalid,
    AppUnsigned,
    build_fab,
    check_app_dir,
    create_publisher_key,
    fab_members,
    load_publisher_private_key,
    load_publisher_public_key,
    manifest,
    sign_app,
    verify_fab,
)
from runtime.keys import PkiBadKey, PkiFileCorrupt, PkiFileExists, PkiInsecurePermissions
from simulations.cli.main import main as silotune_main

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "sigprobe"
version = "1.0.0"
dependencies = ["flwr==1.41.0"]

[tool.flwr.app]
publisher = "silotune"

[tool.flwr.app.components]
serverapp = "sigprobe.server_app:app"
clientapp = "sigprobe.client_app:app"

[tool.flwr.app.config]
note = "default"

[tool.flwr.federations]
default = "local"
"""


def write_app(root: Path) -> Path:
    """A small Flower App folder with files Flower leaves out of its bundle, too."""
    app = root / "sigprobe"
    (app / "sigprobe").mkdir(parents=True)
    (app / "tests").mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / ".gitignore").write_text("secret.py\n")
    (app / "README.md").write_text("# probe\n")
    (app / "sigprobe" / "__init__.py").write_text('"""Probe."""\n')
    (app / "sigprobe" / "client_app.py").write_text("from flwr.clientapp import ClientApp\napp = ClientApp()\n")
    (app / "sigprobe" / "server_app.py").write_text("from flwr.serverapp import ServerApp\napp = ServerApp()\n")
    (app / "sigprobe" / "secret.py").write_text("KEY = 1\n")          # .gitignore'd
    (app / "tests" / "test_probe.py").write_text("def test(): pass\n")  # Flower leaves test_*.py out
    (app / "notes.txt").write_text("not a FAB file type\n")
    return app


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> sig.PublisherKeyFiles:
    return create_publisher_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def signed_app(tmp_path: Path, keys: sig.PublisherKeyFiles) -> Path:
    app = write_app(tmp_path)
    sign_app(app, keys.private_key)
    return app


def rezip(fab: bytes, *, change: dict[str, bytes | None] | None = None, extra: list[zipfile.ZipInfo] | None = None,
          extra_data: bytes = b"") -> bytes:
    """The bundle with entries replaced (bytes), removed (None), or added."""
    change = change or {}
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename in change:
                if change[info.filename] is None:
                    continue
                dst.writestr(info, change[info.filename])  # type: ignore[arg-type]
            else:
                dst.writestr(info, src.read(info))
        for name, data in {k: v for k, v in change.items() if v is not None}.items():
            if name not in src.namelist():
                dst.writestr(name, data)
        for info in extra or []:
            dst.writestr(info, extra_data)
    return out.getvalue()


# ------------------------------------------------------------------ keys
def test_publisher_key_files(tmp_path: Path) -> None:
    files = create_publisher_key(tmp_path / "pki")
    assert stat.S_IMODE(files.private_key.stat().st_mode) == 0o600
    assert files.public_key.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    private, public = load_publisher_private_key(files.private_key), load_publisher_public_key(files.public_key)
    assert sig.publisher_fingerprint(private.public_key()) == sig.publisher_fingerprint(public) == files.fingerprint
    assert files.fingerprint.startswith("SHA256:")
    with pytest.raises(PkiFileExists):
        create_publisher_key(tmp_path / "pki")
    assert create_publisher_key(tmp_path / "pki", force=True).fingerprint != files.fingerprint
    with pytest.raises(PkiFileCorrupt, match="that is a private key"):
        load_publisher_public_key(files.private_key)
    files.private_key.chmod(0o644)
    with pytest.raises(PkiInsecurePermissions):
        load_publisher_private_key(files.private_key)
    # an organization's node key (ECDSA) is not a publisher key
    from cryptography.hazmat.primitives import serialization

    ecdsa = tmp_path / "ec.pub"
    ecdsa.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(PkiBadKey, match="not an Ed25519 key"):
        load_publisher_public_key(ecdsa)


# ------------------------------------------------------------------ manifest and signing
def test_the_signed_manifest_is_exactly_what_the_bundle_holds(signed_app: Path, keys: sig.PublisherKeyFiles) -> None:
    document = json.loads((signed_app / SIGNATURE_FILE).read_text())
    fab = build_fab(signed_app)  # Flower's builder, as `flwr run` builds it
    members = fab_members(fab)
    # the signature file travels in the bundle (a .json name); Flower adds only its .info/CONTENT
    assert set(members) == {name for name, _ in document["files"]} | {SIGNATURE_FILE, ".info/CONTENT"}
    assert sorted(name for name, _ in document["files"]) == [
        "README.md", "pyproject.toml", "sigprobe/__init__.py", "sigprobe/client_app.py", "sigprobe/server_app.py"]
    # pyproject.toml is signed as the bundle holds it: rewritten by Flower, federations dropped
    signed = dict(map(tuple, document["files"]))
    assert signed["pyproject.toml"] == sig.sha256_hex(members["pyproject.toml"])
    assert signed["pyproject.toml"] != sig.sha256_hex((signed_app / "pyproject.toml").read_bytes())
    assert b"federations" not in members["pyproject.toml"]
    assert document["key_fingerprint"] == keys.fingerprint
    assert manifest(members) == [tuple(entry) for entry in document["files"]]
    result = verify_fab(fab, load_publisher_public_key(keys.public_key))
    assert result.files == manifest(members)
    # signing again (the old signature file in the folder) gives the same manifest
    before = document["files"]
    sign_app(signed_app, keys.private_key)
    assert json.loads((signed_app / SIGNATURE_FILE).read_text())["files"] == before
    assert check_app_dir(signed_app).key_fingerprint == keys.fingerprint


def test_signed_bytes_are_canonical() -> None:
    files = [("a.py", "0" * 64), ("b/c.py", "f" * 64)]
    assert sig.signed_bytes(files) == (
        b'{"files":[["a.py","' + b"0" * 64 + b'"],["b/c.py","' + b"f" * 64 + b'"]],'
        b'"format":"silotune-app-signature/1"}')


# ------------------------------------------------------------------ every refusal
@pytest.fixture
def fab_and_key(signed_app: Path, keys: sig.PublisherKeyFiles):  # type: ignore[no-untyped-def]
    return build_fab(signed_app), load_publisher_public_key(keys.public_key)


def test_one_changed_byte_is_a_modified_file(fab_and_key) -> None:  # type: ignore[no-untyped-def]
    fab, key = fab_and_key
    code = fab_members(fab)["sigprobe/client_app.py"]
    tampered = rezip(fab, change={"sigprobe/client_app.py": code[:-2] + b"1\n"})
    with pytest.raises(AppFileModified, match=r"^file sigprobe/client_app.py modified$"):
        verify_fab(tampered, key)


def test_an_added_file_is_refused(fab_and_key) -> None:  # type: ignore[no-untyped-def]
    fab, key = fab_and_key
    with pytest.raises(AppFileUnsigned, match=r"^file sigprobe/evil.py not signed$"):
        verify_fab(rezip(fab, change={"sigprobe/evil.py": b"import os\n"}), key)
    # Flower's metadata directory is no hiding place either
    with pytest.raises(AppFileUnsigned, match=r"file .info/evil.py not signed"):
        verify_fab(rezip(fab, change={".info/evil.py": b"x = 1\n"}), key)


def test_a_removed_file_is_refused(fab_and_key) -> None:  # type: ignore[no-untyped-def]
    fab, key = fab_and_key
    with pytest.raises(AppFileMissing, match=r"^file sigprobe/server_app.py missing$"):
        verify_fab(rezip(fab, change={"sigprobe/server_app.py": None}), key)


def test_an_unsigned_bundle_is_refused(tmp_path: Path, keys: sig.PublisherKeyFiles) -> None:
    fab = build_fab(write_app(tmp_path))
    with pytest.raises(AppUnsigned, match=r"^unsigned app"):
        verify_fab(fab, load_publisher_public_key(keys.public_key))


def test_a_signature_by_another_key_is_refused(signed_app: Path, tmp_path: Path,
                                               keys: sig.PublisherKeyFiles) -> None:
    other = create_publisher_key(tmp_path / "other")
    sign_app(signed_app, other.private_key)  # a valid signature, by the wrong publisher
    with pytest.raises(AppSignatureInvalid, match=rf"^app signature invalid: not signed by the federation's "
                                                  rf"publisher key .*; the bundle names key {re.escape(other.fingerprint)}$"):
        verify_fab(build_fab(signed_app), load_publisher_public_key(keys.public_key))


def test_a_manifest_edited_to_match_a_modified_file_is_refused(fab_and_key) -> None:  # type: ignore[no-untyped-def]
    fab, key = fab_and_key
    members = fab_members(fab)
    code = members["sigprobe/client_app.py"] + b"open('/silo.jsonl').read()\n"
    document = json.loads(members[SIGNATURE_FILE])
    document["files"] = [[n, sig.sha256_hex(code) if n == "sigprobe/client_app.py" else h]
                         for n, h in document["files"]]
    tampered = rezip(fab, change={"sigprobe/client_app.py": code, SIGNATURE_FILE: json.dumps(document).encode()})
    with pytest.raises(AppSignatureInvalid, match="^app signature invalid"):
        verify_fab(tampered, key)
    document["signature"] = base64.b64encode(b"\0" * 64).decode()
    with pytest.raises(AppSignatureInvalid):
        verify_fab(rezip(fab, change={SIGNATURE_FILE: json.dumps(document).encode()}), key)


@pytest.mark.parametrize("text", [b"not json", b"[]", b'{"format": "other"}',
                                  b'{"format": "silotune-app-signature/1", "algorithm": "ed25519", "files": [["a"]]}',
                                  b'{"format": "silotune-app-signature/1", "algorithm": "ed25519", '
                                  b'"files": [["b", "' + b"0" * 64 + b'"], ["a", "' + b"0" * 64 + b'"]]}'])
def test_a_malformed_signature_file_is_refused(fab_and_key, text: bytes) -> None:  # type: ignore[no-untyped-def]
    fab, key = fab_and_key
    with pytest.raises(AppSignatureInvalid, match=f"^app signature invalid: {SIGNATURE_FILE}"):
        verify_fab(rezip(fab, change={SIGNATURE_FILE: text}), key)


def test_malformed_bundles_are_refused(fab_and_key) -> None:  # type: ignore[no-untyped-def]
    fab, key = fab_and_key
    with pytest.raises(AppBundleInvalid, match="not a zip"):
        verify_fab(b"PK\x03\x04 nothing", key)
    # the same name twice: extraction would keep the second copy, not the one that was hashed
    twice = zipfile.ZipInfo("sigprobe/client_app.py")
    with pytest.warns(UserWarning, match="Duplicate name"):
        doubled = rezip(fab, extra=[twice], extra_data=b"import os\n")
    with pytest.raises(AppBundleInvalid, match="appears twice"):
        verify_fab(doubled, key)
    link = zipfile.ZipInfo("sigprobe/link.py")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(AppBundleInvalid, match="not a regular file"):
        verify_fab(rezip(fab, extra=[link], extra_data=b"/data/silo.jsonl"), key)
    with pytest.raises(AppBundleInvalid, match="not a regular file"):
        verify_fab(rezip(fab, extra=[zipfile.ZipInfo("sigprobe/dir/")]), key)


def test_flowers_own_manifest_is_not_signed_and_not_needed(fab_and_key) -> None:  # type: ignore[no-untyped-def]
    """.info/CONTENT is derived from the other files and deleted before installation."""
    fab, key = fab_and_key
    verify_fab(rezip(fab, change={".info/CONTENT": b"anything"}), key)


def test_a_changed_folder_rebuilt_by_flower_is_refused(signed_app: Path, keys: sig.PublisherKeyFiles) -> None:
    """The realistic route: a file of the signed folder changes, `flwr run` builds the bundle."""
    key = load_publisher_public_key(keys.public_key)
    (signed_app / "sigprobe" / "helper.py").write_text("x = 1\n")
    with pytest.raises(AppFileUnsigned, match="file sigprobe/helper.py not signed"):
        verify_fab(build_fab(signed_app), key)
    (signed_app / "sigprobe" / "helper.py").unlink()
    (signed_app / "README.md").write_text("# probe!\n")
    with pytest.raises(AppFileModified, match="file README.md modified"):
        verify_fab(build_fab(signed_app), key)
    # files Flower leaves out of the bundle are not part of the app
    (signed_app / "README.md").write_text("# probe\n")
    (signed_app / "notes.txt").write_text("changed\n")
    (signed_app / "sigprobe" / "secret.py").write_text("KEY = 2\n")
    verify_fab(build_fab(signed_app), key)


# ------------------------------------------------------------------ the coordinator's check
def test_check_app_dir_names_what_to_do(signed_app: Path, tmp_path: Path) -> None:
    (signed_app / "sigprobe" / "client_app.py").write_text("app = None\n")
    with pytest.raises(AppFileModified, match=r"file sigprobe/client_app.py modified \(the app folder .* "
                                              r"re-sign it with `silotune pki sign-app"):
        check_app_dir(signed_app)
    with pytest.raises(AppUnsigned, match="has no silotune-app.sig.json; sign it with `silotune pki sign-app"):
        check_app_dir(write_app(tmp_path / "unsigned"))
    (signed_app / ".gitignore").write_text(f"secret.py\n{SIGNATURE_FILE}\n")
    with pytest.raises(AppUnsigned, match="Flower leaves it out of the bundle"):
        check_app_dir(signed_app)


# ------------------------------------------------------------------ the task process's module hygiene
def test_the_task_process_forgets_the_apps_packages_before_loading_it(fab_and_key) -> None:  # type: ignore[no-untyped-def]
    fab, _ = fab_and_key
    assert app_task.app_packages(fab) == {"sigprobe"}
    sys.modules["sigprobe"] = sys  # type: ignore[assignment]
    sys.modules["sigprobe.client_app"] = sys  # type: ignore[assignment]
    sys.modules["sigprobe_other"] = sys  # type: ignore[assignment]
    try:
        assert sorted(app_task.forget_modules({"sigprobe"})) == ["sigprobe", "sigprobe.client_app"]
        assert "sigprobe_other" in sys.modules
    finally:
        sys.modules.pop("sigprobe_other", None)
    # the silotune app: its own packages, so the agent's installed copies give way to the bundle's
    assert {"clients", "runtime", "server", "protos", "strategies", "simulations"} <= app_task.app_packages(
        build_fab(Path(__file__).resolve().parent.parent))


def test_the_task_process_refuses_app_modules_from_outside_the_verified_folder(tmp_path: Path) -> None:
    import types

    inside, outside = types.ModuleType("sigprobe"), types.ModuleType("sigprobe.x")
    inside.__file__ = str(tmp_path / "app" / "sigprobe" / "__init__.py")
    outside.__file__ = str(tmp_path / "site-packages" / "sigprobe" / "x.py")
    sys.modules.update({"sigprobe": inside})
    try:
        assert app_task.check_loaded_from(tmp_path / "app", {"sigprobe"}) == 1
        sys.modules["sigprobe.x"] = outside
        with pytest.raises(RuntimeError, match="imported from outside .*: sigprobe.x"):
            app_task.check_loaded_from(tmp_path / "app", {"sigprobe"})
    finally:
        app_task.forget_modules({"sigprobe"})


def test_launcher_command_lines() -> None:
    cmd = app_launcher.command(app_launcher.TASK, "127.0.0.1:9", publisher_key="/k/publisher.pub", parent_pid=7)
    assert cmd[:4] == [sys.executable, "-P", "-m", "clients.app_launcher"] and "flwr-clientapp" in cmd
    assert cmd[cmd.index("--app-publisher-key") + 1] == "/k/publisher.pub" and "--unsigned-apps" not in cmd
    assert "--unsigned-apps" in app_launcher.command(app_launcher.SERVE, "127.0.0.1:9", publisher_key=None)


# ------------------------------------------------------------------ the commands
def test_pki_app_key_and_sign_app_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = write_app(tmp_path)
    assert silotune_main(["pki", "app-key", "--dir", str(tmp_path / "pki")]) == 0
    assert "publisher.pub" in capsys.readouterr().out
    assert silotune_main(["pki", "sign-app", "--key", str(tmp_path / "pki" / "publisher.key"),
                          "--app-dir", str(app)]) == 0
    assert "signed 5 files" in capsys.readouterr().out
    verify_fab(build_fab(app), load_publisher_public_key(tmp_path / "pki" / "publisher.pub"))
    assert silotune_main(["pki", "app-key", "--dir", str(tmp_path / "pki")]) == 2
    assert "PkiFileExists" in capsys.readouterr().err


def test_agent_start_needs_a_publisher_key_or_an_explicit_opt_out(
        tmp_path: Path, keys: sig.PublisherKeyFiles, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.keys import create_org_key
    from server import pki

    silo = tmp_path / "silo.jsonl"
    silo.write_text('{"text": "a", "label": "b"}\n')
    pki.init_ca(tmp_path / "pki", days=5)
    org = create_org_key(tmp_path / "keys", "bank-a")
    secure = ["agent", "start", "--coordinator", "127.0.0.1:1", "--data", str(silo),
              "--ca-cert", str(tmp_path / "pki" / "ca.pem"), "--private-key", str(org.private_key)]
    assert silotune_main(secure) == 2
    assert "pass --app-publisher-key" in capsys.readouterr().err
    assert silotune_main([*secure, "--unsigned-apps", "--app-publisher-key", str(keys.public_key)]) == 2
    assert "drop --app-publisher-key" in capsys.readouterr().err
    assert silotune_main([*secure, "--app-publisher-key", str(keys.private_key)]) == 2
    assert "PkiFileCorrupt" in capsys.readouterr().err


def test_coordinator_refuses_an_app_folder_changed_since_signing(
        signed_app: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before anything starts, even with --insecure: agents checking signatures would refuse it."""
    (signed_app / "sigprobe" / "client_app.py").write_text("app = None\n")
    state = tmp_path / "coord"
    assert silotune_main(["coordinator", "--insecure", "--app-dir", str(signed_app), "--state-dir", str(state),
                          "--set", "model=tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert "AppFileModified: file sigprobe/client_app.py modified" in err and "re-sign" in err
    assert not (state / "superlink.log").exists()  # nothing was started
    unsigned = write_app(tmp_path / "unsigned")
    assert silotune_main(["coordinator", "--pki-dir", str(tmp_path / "nopki"), "--app-dir", str(unsigned),
                          "--state-dir", str(state), "--set", "model=tiny-llama"]) == 2
    assert "PkiFileMissing" in capsys.readouterr().err  # TLS files are checked first
    from server import pki

    pki.init_ca(tmp_path / "pki", days=5)
    pki.issue_server_cert(tmp_path / "pki", [])
    assert silotune_main(["coordinator", "--pki-dir", str(tmp_path / "pki"), "--app-dir", str(unsigned),
                          "--state-dir", str(state), "--set", "model=tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert "AppUnsigned: unsigned app" in err and "--unsigned-app" in err
    assert not (state / "superlink.log").exists()


def test_every_refusal_is_an_app_rejected_value_error() -> None:
    for cls in (AppUnsigned, AppSignatureInvalid, AppFileModified, AppFileUnsigned, AppFileMissing, AppBundleInvalid):
        assert issubclass(cls, AppRejected) and issubclass(cls, ValueError)
