"""runtime/keys.py, server/pki.py, server/enrollment.py and `silotune pki`, without a SuperLink.

Every key and certificate is generated here, under tmp_path. Keys are loaded
with Flower's own loaders (`flwr supernode register`'s and
`flower-supernode --auth-supernode-private-key`'s); certificates go through
a real TLS handshake with Python's ssl module (what Flower's HTTP clients use).
The live SuperLink side is tests/test_secure_deployment.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from clients.cli.agent import check_coordinator_tls
from runtime import keys
from server import enrollment, pki
from server.superlink import FlwrCliError
from simulations.cli.main import main as silotune_main


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture()
def federation(tmp_path: Path) -> Path:
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir, days=30)
    pki.issue_server_cert(pki_dir, ["10.20.30.40", "coordinator.example.org"], days=10)
    return pki_dir


# ------------------------------------------------------------------- CA + server certificate
def test_ca_is_a_self_signed_ca_with_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    files = pki.init_ca(tmp_path / "pki", days=30)
    assert (files.key.name, files.cert.name) == ("ca.key", "ca.pem")
    assert mode(files.key) == 0o600 and mode(files.cert) == 0o644
    cert = keys.load_ca(files.cert)
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=10)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_server_cert_chains_to_the_ca_with_ip_and_dns_sans(federation: Path) -> None:
    ca = x509.load_pem_x509_certificate((federation / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((federation / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.20.30.40", "127.0.0.1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"coordinator.example.org", "localhost"}
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert mode(federation / "server.key") == 0o600
    # Full RFC 5280 / web PKI path validation, per name a client may dial.
    for name in (x509.IPAddress(__import__("ipaddress").ip_address("10.20.30.40")),
                 x509.DNSName("coordinator.example.org"), x509.DNSName("localhost")):
        PolicyBuilder().store(Store([ca])).build_server_verifier(name).verify(cert, [])
    files = pki.coordinator_files(federation, ["127.0.0.1", "coordinator.example.org"])
    assert files.ca_cert == federation / "ca.pem"


def serve_tls_once(pki_dir: Path) -> tuple[int, threading.Thread]:
    """A one-connection TLS server on 127.0.0.1 with the federation's server certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki_dir / "server.pem", pki_dir / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            listener.settimeout(20)
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def test_python_tls_client_trusting_the_ca_accepts_the_coordinator(federation: Path) -> None:
    port, thread = serve_tls_once(federation)
    client = ssl.create_default_context(cafile=str(federation / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with client.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            assert tls.recv(2) == b"ok"
    thread.join(10)


def test_agent_tls_probe_names_a_wrong_ca_a_plaintext_server_and_an_absent_one(
    federation: Path, tmp_path: Path
) -> None:
    port, thread = serve_tls_once(federation)
    assert check_coordinator_tls(f"127.0.0.1:{port}", federation / "ca.pem") is True
    thread.join(10)

    other = pki.init_ca(tmp_path / "other", days=5)
    port, thread = serve_tls_once(federation)
    with pytest.raises(keys.PkiWrongCA, match="does not vouch"):
        check_coordinator_tls(f"127.0.0.1:{port}", other.cert)
    thread.join(10)

    plain = socket.create_server(("127.0.0.1", 0))  # accepts, then answers garbage
    port = plain.getsockname()[1]

    def answer_plaintext() -> None:
        conn, _ = plain.accept()
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_plaintext, daemon=True).start()
    with pytest.raises(keys.PkiError, match="--insecure"):
        check_coordinator_tls(f"127.0.0.1:{port}", federation / "ca.pem")
    plain.close()

    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert check_coordinator_tls(f"127.0.0.1:{port}", federation / "ca.pem", timeout=2) is False


# ------------------------------------------------------------------- named errors
def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(keys.PkiFileMissing, match=r"ca\.pem does not exist.*pki init"):
        pki.coordinator_files(tmp_path / "nothing")
    pki.init_ca(tmp_path / "half", days=5)
    with pytest.raises(keys.PkiFileMissing, match=r"server\.pem does not exist.*server-cert"):
        pki.coordinator_files(tmp_path / "half")
    with pytest.raises(keys.PkiFileMissing, match="create the CA first"):
        pki.issue_server_cert(tmp_path / "nothing", ["127.0.0.1"])
    with pytest.raises(keys.PkiFileMissing, match="missing.pub does not exist"):
        keys.load_org_public_key(tmp_path / "missing.pub")


def test_corrupt_files_are_named(federation: Path, tmp_path: Path) -> None:
    (federation / "server.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    with pytest.raises(keys.PkiFileCorrupt, match="server.pem is not a PEM X.509 certificate"):
        pki.coordinator_files(federation)
    junk = tmp_path / "junk.key"
    junk.write_bytes(os.urandom(64))
    junk.chmod(0o600)
    with pytest.raises(keys.PkiFileCorrupt, match="not an OpenSSH private key"):
        keys.load_org_private_key(junk)
    with pytest.raises(keys.PkiFileCorrupt, match="not a PEM private key"):
        keys.load_pem_private_key(junk)
    with pytest.raises(keys.PkiFileCorrupt, match="not an OpenSSH public key"):
        keys.load_org_public_key(junk)


def test_expired_and_not_yet_valid_certificates_are_named(federation: Path) -> None:
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=11)  # server cert: 10 days
    with pytest.raises(keys.PkiCertificateExpired, match="server certificate .* expired on"):
        keys.verify_server_cert(federation / "ca.pem", federation / "server.pem", at=later)
    much_later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=31)  # CA: 30 days
    with pytest.raises(keys.PkiCertificateExpired, match="CA certificate .* expired on"):
        keys.verify_server_cert(federation / "ca.pem", federation / "server.pem", at=much_later)
    earlier = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    with pytest.raises(keys.PkiCertificateExpired, match="not valid before"):
        keys.verify_server_cert(federation / "ca.pem", federation / "server.pem", at=earlier)


def test_wrong_ca_key_mismatch_and_host_mismatch_are_named(federation: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other, days=5)
    pki.issue_server_cert(other, ["127.0.0.1"])
    with pytest.raises(keys.PkiWrongCA, match="was not issued by the CA"):
        keys.verify_server_cert(other / "ca.pem", federation / "server.pem")
    with pytest.raises(keys.PkiWrongCA, match="is not a CA"):
        keys.load_ca(federation / "server.pem")
    with pytest.raises(keys.PkiKeyMismatch, match="does not belong"):
        keys.verify_server_cert(federation / "ca.pem", federation / "server.pem", other / "server.key")
    with pytest.raises(keys.PkiHostMismatch, match="not valid for 'elsewhere.example.org'"):
        keys.verify_server_cert(federation / "ca.pem", federation / "server.pem",
                               hosts=["elsewhere.example.org"])
    with pytest.raises(keys.PkiHostMismatch):
        pki.coordinator_files(federation, ["10.9.9.9"])
    with pytest.raises(keys.PkiError, match="neither an IP address nor a DNS name"):
        pki.issue_server_cert(federation, ["bad host!"], force=True)


def test_private_keys_readable_by_others_are_refused(federation: Path, tmp_path: Path) -> None:
    (federation / "server.key").chmod(0o644)
    with pytest.raises(keys.PkiInsecurePermissions, match="chmod 600"):
        pki.coordinator_files(federation)
    org = keys.create_org_key(tmp_path / "keys", "bank-a")
    org.private_key.chmod(0o640)
    with pytest.raises(keys.PkiInsecurePermissions):
        keys.agent_files(federation / "ca.pem", org.private_key)


def test_existing_files_are_not_overwritten_without_force(federation: Path, tmp_path: Path) -> None:
    before = (federation / "ca.pem").read_bytes()
    with pytest.raises(keys.PkiFileExists, match="--force"):
        pki.init_ca(federation)
    assert (federation / "ca.pem").read_bytes() == before
    with pytest.raises(keys.PkiFileExists):
        pki.issue_server_cert(federation, ["127.0.0.1"])
    pki.issue_server_cert(federation, ["127.0.0.1"], force=True)
    keys.create_org_key(tmp_path, "bank-a")
    with pytest.raises(keys.PkiFileExists):
        keys.create_org_key(tmp_path, "bank-a")


# ------------------------------------------------------------------- organization keys
def test_org_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (
        public_key_to_bytes,
        sign_message,
        uses_nist_ec_curve,
        verify_signature,
    )
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    files = keys.create_org_key(tmp_path / "keys", "bank-a")
    assert (files.private_key.name, files.public_key.name) == ("bank-a.key", "bank-a.pub")
    assert mode(files.private_key) == 0o600 and mode(files.public_key) == 0o644
    registered = try_load_public_key(files.public_key)  # what `flwr supernode register` sends
    private, public = _try_setup_client_authentication(argparse.Namespace(
        auth_supernode_private_key=str(files.private_key), auth_supernode_public_key=None))
    assert isinstance(private.curve, ec.SECP384R1) and uses_nist_ec_curve(public)
    assert public_key_to_bytes(public) == registered  # the SuperLink matches on these bytes
    signature = sign_message(private, b"2030-01-01T00:00:00+00:00")
    assert verify_signature(public, b"2030-01-01T00:00:00+00:00", signature)
    assert files.fingerprint == keys.public_key_fingerprint(keys.load_org_public_key(files.public_key))
    assert files.fingerprint.startswith("SHA256:")


def test_wrong_key_kinds_are_named(tmp_path: Path) -> None:
    files = keys.create_org_key(tmp_path, "bank-a")
    with pytest.raises(keys.PkiFileCorrupt, match="that is a private key"):
        keys.load_org_public_key(files.private_key)
    with pytest.raises(keys.PkiFileCorrupt, match="that is a public key"):
        keys.load_org_private_key(files.public_key)
    ed = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed.pub").write_bytes(ed.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(keys.PkiBadKey, match="not an ECDSA key"):
        keys.load_org_public_key(tmp_path / "ed.pub")
    k1 = ec.generate_private_key(ec.SECP256K1())  # not a NIST curve
    (tmp_path / "k1.key").write_bytes(k1.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "k1.key").chmod(0o600)
    with pytest.raises(keys.PkiError):
        keys.load_org_private_key(tmp_path / "k1.key")
    for bad in ("", "../etc", "a b", "-x", "x" * 65):
        with pytest.raises(keys.PkiBadName):
            keys.create_org_key(tmp_path, bad)


# ------------------------------------------------------------------- enrollment (fake flwr)
class FakeFlwr:
    """Stands in for `flwr supernode register/unregister --format json`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.keys: dict[int, bytes] = {}
        self.fail: str | None = None

    def __call__(self, *args: str) -> dict:
        self.calls.append(args)
        if self.fail:
            raise FlwrCliError(self.fail)
        if args[:2] == ("supernode", "register"):
            node_id = 1000 + sum(c[:2] == ("supernode", "register") for c in self.calls) - 1
            self.keys[node_id] = Path(args[2]).read_bytes()
            return {"success": True, "node-id": node_id}
        if args[:2] == ("supernode", "unregister"):
            del self.keys[int(args[2])]
            return {"success": True, "node-id": int(args[2])}
        raise AssertionError(args)


def coordinator_state(tmp_path: Path, insecure: bool = False) -> Path:
    state = tmp_path / "coord"
    (state / "flwr-home").mkdir(parents=True)
    extra = "" if insecure else f'root-certificates = "{tmp_path}/pki/ca.pem"\n'
    (state / "flwr-home" / "config.toml").write_text(
        '[superlink]\ndefault = "silotune"\n\n[superlink.silotune]\n'
        f'address = "127.0.0.1:1"\ninsecure = {"true" if insecure else "false"}\n{extra}')
    return state


def test_enroll_and_revoke_keep_the_name_to_node_map(tmp_path: Path) -> None:
    state = coordinator_state(tmp_path)
    a = keys.create_org_key(tmp_path / "keys", "bank-a")
    b = keys.create_org_key(tmp_path / "keys", "bank-b")
    flwr = FakeFlwr()
    row = enrollment.enroll(state, "bank-a", a.public_key, flwr=flwr)
    assert row.node_id == 1000 and row.fingerprint == a.fingerprint and row.active
    assert flwr.calls[-1] == ("supernode", "register", str(a.public_key), "silotune", "--name", "bank-a")
    assert enrollment.enroll(state, "bank-a", a.public_key, flwr=flwr).node_id == 1000  # idempotent
    assert len(flwr.calls) == 1
    with pytest.raises(enrollment.EnrollmentError, match="already enrolled with another key"):
        enrollment.enroll(state, "bank-a", b.public_key, flwr=flwr)
    with pytest.raises(enrollment.EnrollmentError, match="already enrolled as 'bank-a'"):
        enrollment.enroll(state, "bank-c", a.public_key, flwr=flwr)
    enrollment.enroll(state, "bank-b", b.public_key, flwr=flwr)
    assert [r.name for r in enrollment.enrollments(state)] == ["bank-a", "bank-b"]

    revoked = enrollment.revoke(state, "bank-a", flwr=flwr)
    assert revoked.revoked_at and flwr.calls[-1] == ("supernode", "unregister", "1000", "silotune")
    assert 1000 not in flwr.keys
    assert [r.name for r in enrollment.enrollments(state)] == ["bank-b"]
    assert [r.name for r in enrollment.enrollments(state, include_revoked=True)] == ["bank-a", "bank-b"]
    with pytest.raises(enrollment.EnrollmentError, match="not enrolled"):
        enrollment.revoke(state, "bank-a", flwr=flwr)
    saved = json.loads((state / "enrollment.json").read_text())["enrollments"]
    assert saved[0]["revoked_at"] and saved[1]["node_id"] == 1001
    # a revoked key stays revoked (Flower keeps it, unique); a new key pair can be enrolled
    with pytest.raises(enrollment.EnrollmentError, match="stays revoked"):
        enrollment.enroll(state, "bank-a", a.public_key, flwr=flwr)
    a2 = keys.create_org_key(tmp_path / "keys", "bank-a", force=True)
    assert enrollment.enroll(state, "bank-a", a2.public_key, flwr=flwr).node_id == 1002


def test_enrollment_errors_are_named(tmp_path: Path) -> None:
    a = keys.create_org_key(tmp_path / "keys", "bank-a")
    with pytest.raises(enrollment.EnrollmentError, match="no coordinator state"):
        enrollment.enroll(tmp_path / "nowhere", "bank-a", a.public_key, flwr=FakeFlwr())
    insecure = coordinator_state(tmp_path, insecure=True)
    with pytest.raises(enrollment.EnrollmentError, match="runs --insecure"):
        enrollment.enroll(insecure, "bank-a", a.public_key, flwr=FakeFlwr())
    state = tmp_path / "secure"
    coordinator_state(tmp_path / "s")
    state = tmp_path / "s" / "coord"
    flwr = FakeFlwr()
    flwr.fail = 'supernode register failed: {"success": false} Public key already in use.'
    with pytest.raises(enrollment.EnrollmentError, match="already has this public key"):
        enrollment.enroll(state, "bank-a", a.public_key, flwr=flwr)
    flwr.fail = "supernode register exited 1: httpx.ConnectError: [Errno 111] Connection refused"
    with pytest.raises(enrollment.EnrollmentError, match="cannot reach the coordinator"):
        enrollment.enroll(state, "bank-a", a.public_key, flwr=flwr)
    assert enrollment.enrollments(state) == []  # nothing recorded for a failed registration
    with pytest.raises(keys.PkiFileCorrupt):
        enrollment.enroll(state, "bank-a", a.private_key, flwr=FakeFlwr())
    with pytest.raises(enrollment.EnrollmentError, match="ORG=PUBLIC_KEY_PATH"):
        enrollment.parse_enroll_arg("bank-a")
    assert enrollment.parse_enroll_arg("bank-a=/k/a.pub") == ("bank-a", Path("/k/a.pub"))


# ------------------------------------------------------------------- the command line
def test_pki_commands_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert silotune_main(["pki", "init", "--dir", d, "--days", "20"]) == 0
    assert silotune_main(["pki", "server-cert", "--dir", d, "--host", "192.0.2.7",
                          "--host", "coord.example.org"]) == 0
    assert silotune_main(["pki", "org-key", "--dir", str(tmp_path / "keys"), "--name", "bank-a"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(tmp_path / "keys" / "bank-a.pub")
    pki.coordinator_files(d, ["192.0.2.7", "coord.example.org", "127.0.0.1"])
    # named errors, no traceback, exit 2
    assert silotune_main(["pki", "init", "--dir", d]) == 2
    assert silotune_main(["pki", "enroll", "--coordinator-dir", str(tmp_path / "none"),
                          "--name", "bank-a", "--public-key", str(tmp_path / "keys" / "bank-a.pub")]) == 2
    err = capsys.readouterr().err
    assert "PkiFileExists" in err and "EnrollmentError" in err and "Traceback" not in err


def test_secure_by_default_deployment_commands_refuse_missing_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    silo = tmp_path / "silo.jsonl"
    silo.write_text('{"text": "a", "label": "b"}\n')
    assert silotune_main(["agent", "start", "--coordinator", "127.0.0.1:1", "--data", str(silo)]) == 2
    assert "--ca-cert" in capsys.readouterr().err
    pki.init_ca(tmp_path / "pki", days=5)
    pki.issue_server_cert(tmp_path / "pki", [])
    org = keys.create_org_key(tmp_path / "keys", "bank-a")
    # the server certificate is not a CA certificate
    assert silotune_main(["agent", "start", "--coordinator", "127.0.0.1:1", "--data", str(silo),
                          "--ca-cert", str(tmp_path / "pki" / "server.pem"),
                          "--private-key", str(org.private_key)]) == 2
    assert "PkiWrongCA" in capsys.readouterr().err
    assert silotune_main(["agent", "start", "--insecure", "--ca-cert", "x", "--coordinator", "127.0.0.1:1",
                          "--data", str(silo)]) == 2
    assert "drop --ca-cert" in capsys.readouterr().err
    state = tmp_path / "coord"
    assert silotune_main(["coordinator", "--pki-dir", str(tmp_path / "nopki"), "--state-dir", str(state),
                          "--set", "model=tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert "PkiFileMissing" in err and "ca.pem does not exist" in err
    assert silotune_main(["coordinator", "--insecure", "--enroll", f"bank-a={org.public_key}",
                          "--state-dir", str(state)]) == 2
    assert "--enroll needs node authentication" in capsys.readouterr().err
    assert not (state / "state.db").exists()  # nothing was started
