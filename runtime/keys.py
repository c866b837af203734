"""Keys and certificates as an organization handles them, and the checks both sides share.

Pure `cryptography`; no network. An organization (`silotune agent start`,
`silotune pki org-key`) needs: the federation's CA certificate, loaded and
checked (`load_ca`); the coordinator's certificate verified against it the
way its TLS client will (`verify_server_cert`); and its own node key pair,
created (`create_org_key`) and loaded (`load_org_private_key`, `agent_files`).
The coordinator's operator uses the same loaders and checks (server/pki.py
issues the CA and the coordinator's certificate on top of them; server/
enrollment.py loads the organizations' public keys), so the key formats and
the file rules are defined once, here:

- node keys: ECDSA on a NIST curve, OpenSSH formats (`ORG.key`, `ORG.pub`),
  the ones `flower-supernode --auth-supernode-private-key` and
  `flwr supernode register` load; the private key never leaves the
  organization;
- private keys are written 0600 from the start and refused when other users
  can read or write them (like ssh); nothing is overwritten without `force`.

Every failure is a PkiError subclass naming the file and what is wrong with it:
PkiFileMissing, PkiFileExists, PkiFileCorrupt, PkiCertificateExpired,
PkiWrongCA, PkiHostMismatch, PkiKeyMismatch, PkiInsecurePermissions,
PkiBadKey, PkiBadName.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

ORG_KEY_SUFFIX = ".key"
ORG_PUB_SUFFIX = ".pub"

CURVE = ec.SECP384R1  # P-384: the curve Flower's docs use; any NIST curve is accepted
NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# ------------------------------------------------------------------ errors
class PkiError(ValueError):
    """A PKI file is missing, unreadable, invalid, or does not fit the others."""


class PkiFileMissing(PkiError, FileNotFoundError):
    """A certificate or key file that is needed does not exist."""


class PkiFileExists(PkiError, FileExistsError):
    """Refusing to overwrite an existing key or certificate (pass force/--force)."""


class PkiFileCorrupt(PkiError):
    """A file exists but is not the PEM/OpenSSH object it should be."""


class PkiCertificateExpired(PkiError):
    """A certificate is outside its validity period (expired or not yet valid)."""


class PkiWrongCA(PkiError):
    """A certificate was not issued by the CA it is checked against."""


class PkiHostMismatch(PkiError):
    """The server certificate has no subject alternative name for a host."""


class PkiKeyMismatch(PkiError):
    """A certificate and a private key do not belong together."""


class PkiInsecurePermissions(PkiError):
    """A private key file is readable or writable by other users."""


class PkiBadKey(PkiError):
    """A key has the wrong type or curve for its use."""


class PkiBadName(PkiError):
    """An organization name that cannot be used as a file name / node name."""


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class OrgKeyFiles:
    """An organization's node-authentication key pair."""

    private_key: Path
    public_key: Path
    fingerprint: str


# ------------------------------------------------------------------ file I/O
def check_name(name: str) -> str:
    """An organization name: 1-64 of [A-Za-z0-9._-], starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PkiBadName(
            f"organization name {name!r} is not allowed: use 1-64 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


def refuse_existing(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise PkiFileExists(
            f"{', '.join(existing)} already exist(s); refusing to overwrite "
            "(pass --force to replace)"
        )


def write_private(path: Path, data: bytes) -> Path:
    """Write a secret with mode 0600 from the start (never briefly world-readable).

    Written to a temporary file in the same directory, then renamed over
    `path`, so a crash leaves either the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask; be explicit
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def write_public(path: Path, data: bytes) -> Path:
    """Write a certificate or public key (mode 0644), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_file(path: Path | str, what: str) -> bytes:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PkiFileMissing(f"{what} {path} does not exist")
    try:
        return path.read_bytes()
    except OSError as err:
        raise PkiFileCorrupt(f"{what} {path} cannot be read: {err}") from err


def check_private_permissions(path: Path | str, what: str = "private key") -> None:
    """Refuse a private key that other users can read or write (like ssh does)."""
    path = Path(path).expanduser()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PkiInsecurePermissions(
            f"{what} {path} has mode {mode:04o}: other users can access it; "
            f"run `chmod 600 {path}`"
        )


# ------------------------------------------------------------------ loading
def load_certificate(path: Path | str, what: str = "certificate") -> x509.Certificate:
    """A PEM certificate; PkiFileMissing / PkiFileCorrupt otherwise."""
    data = read_file(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise PkiFileCorrupt(f"{what} {path} is not a PEM X.509 certificate: {err}") from err


def load_pem_private_key(
    path: Path | str, what: str = "private key", *, check_permissions: bool = True
) -> ec.EllipticCurvePrivateKey:
    """A PEM (PKCS#8 or SEC1) EC private key without a passphrase."""
    data = read_file(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:
        raise PkiFileCorrupt(f"{what} {path} is encrypted; silotune needs it unencrypted") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise PkiFileCorrupt(f"{what} {path} is not a PEM private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiBadKey(f"{what} {path} is a {type(key).__name__}, not an EC key")
    if check_permissions:
        check_private_permissions(path, what)
    return key


def _check_nist(key: ec.EllipticCurvePublicKey, path: Path | str, what: str) -> None:
    if not isinstance(key.curve, NIST_CURVES):
        raise PkiBadKey(
            f"{what} {path} uses curve {key.curve.name}; Flower's node authentication "
            "needs a NIST curve (secp256r1, secp384r1, secp521r1)"
        )


def load_org_public_key(path: Path | str) -> ec.EllipticCurvePublicKey:
    """An organization's public key, OpenSSH format (`ecdsa-sha2-nistp384 AAAA...`).

    The same checks as `flwr supernode register`: an EC key on a NIST curve.
    """
    what = "organization public key"
    data = read_file(path, what)
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as err:
        hint = " (that is a private key: pass the .pub file)" if b"PRIVATE KEY" in data else ""
        raise PkiFileCorrupt(
            f"{what} {path} is not an OpenSSH public key{hint}: {err}"
        ) from err
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiBadKey(f"{what} {path} is a {type(key).__name__}, not an ECDSA key")
    _check_nist(key, path, what)
    return key


def load_org_private_key(
    path: Path | str, *, check_permissions: bool = True
) -> ec.EllipticCurvePrivateKey:
    """An organization's private key, unencrypted OpenSSH format (what flower-supernode loads)."""
    what = "organization private key"
    data = read_file(path, what)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError as err:
        raise PkiFileCorrupt(f"{what} {path} is passphrase-protected; Flower needs it "
                             "unencrypted (keep it 0600 instead)") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        hint = " (that is a public key: pass the .key file)" if data.startswith(b"ecdsa-") else ""
        raise PkiFileCorrupt(f"{what} {path} is not an OpenSSH private key{hint}: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiBadKey(f"{what} {path} is a {type(key).__name__}, not an ECDSA key")
    _check_nist(key.public_key(), path, what)
    if check_permissions:
        check_private_permissions(path, what)
    return key


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """`SHA256:...` of the OpenSSH key blob, the same string `ssh-keygen -l` prints."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# ------------------------------------------------------------------ checks
def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def check_validity(cert: x509.Certificate, path: Path | str, what: str,
                   at: dt.datetime | None = None) -> None:
    """PkiCertificateExpired unless `at` (default: now) lies in the validity period."""
    at = at or utc_now()
    if at > cert.not_valid_after_utc:
        raise PkiCertificateExpired(
            f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if at < cert.not_valid_before_utc:
        raise PkiCertificateExpired(
            f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def load_ca(ca_cert: Path | str, at: dt.datetime | None = None) -> x509.Certificate:
    """The CA certificate, checked: a CA, self-signed, within its validity period."""
    cert = load_certificate(ca_cert, "CA certificate")
    if not _is_ca(cert):
        raise PkiWrongCA(f"CA certificate {ca_cert} is not a CA (basicConstraints CA:FALSE): "
                         "pass the federation's ca.pem, not a server certificate")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise PkiWrongCA(f"CA certificate {ca_cert} is not self-signed: {err}") from err
    check_validity(cert, ca_cert, "CA certificate", at)
    return cert


def san_hosts(cert: x509.Certificate) -> list[str]:
    """The certificate's subject alternative names, IPs and DNS names as strings."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] + list(
        san.get_values_for_type(x509.DNSName)
    )


def _verifier_name(host: str) -> x509.verification.Subject:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host.rstrip(".").lower())


def verify_server_cert(
    ca_cert: Path | str,
    server_cert: Path | str,
    server_key: Path | str | None = None,
    hosts: Sequence[str] = (),
    at: dt.datetime | None = None,
) -> x509.Certificate:
    """Check the coordinator's certificate the way an agent's TLS client will.

    Issued by `ca_cert` (PkiWrongCA), within its validity period
    (PkiCertificateExpired), matching `server_key` (PkiKeyMismatch) and, for
    every host in `hosts`, passing a full RFC 5280 path validation with that
    host as the server name (PkiHostMismatch): the same checks a TLS client
    makes, so a certificate that passes here is accepted by Flower's clients.
    """
    ca = load_ca(ca_cert, at)
    cert = load_certificate(server_cert, "server certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise PkiWrongCA(
            f"server certificate {server_cert} was not issued by the CA {ca_cert} "
            f"(issuer {cert.issuer.rfc4514_string()!r}, CA {ca.subject.rfc4514_string()!r})"
        ) from err
    check_validity(cert, server_cert, "server certificate", at)
    if server_key is not None:
        key = load_pem_private_key(server_key, "server private key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise PkiKeyMismatch(f"server private key {server_key} does not belong to "
                                 f"the server certificate {server_cert}")
    store = Store([ca])
    for host in hosts:
        builder = PolicyBuilder().store(store)
        if at is not None:
            builder = builder.time(at)
        verifier = builder.build_server_verifier(_verifier_name(host))
        try:
            verifier.verify(cert, [])
        except VerificationError as err:
            if host not in san_hosts(cert):
                raise PkiHostMismatch(
                    f"server certificate {server_cert} is not valid for {host!r}: its "
                    f"subject alternative names are {san_hosts(cert)}; issue a new one "
                    f"with `silotune pki server-cert --host {host} ...`"
                ) from err
            raise PkiError(f"server certificate {server_cert} fails validation for "
                           f"{host!r}: {err}") from err
    return cert


def agent_files(ca_cert: Path | str, private_key: Path | str) -> tuple[Path, Path, str]:
    """Check what `silotune agent` needs: a CA certificate and its org private key.

    Returns (ca_cert, private_key, public key fingerprint).
    """
    ca_path = Path(ca_cert).expanduser().resolve()
    key_path = Path(private_key).expanduser().resolve()
    load_ca(ca_path)
    key = load_org_private_key(key_path)
    return ca_path, key_path, public_key_fingerprint(key.public_key())


# ------------------------------------------------------------------ organization keys
def create_org_key(key_dir: Path | str, name: str, *, force: bool = False) -> OrgKeyFiles:
    """An organization's node key pair: `NAME.key` (OpenSSH private, 0600), `NAME.pub`.

    The private key stays in the organization (`silotune agent --private-key`);
    the public key goes to the coordinator's operator (`silotune pki enroll`).
    """
    check_name(name)
    key_dir = Path(key_dir).expanduser().resolve()
    private_path = key_dir / f"{name}{ORG_KEY_SUFFIX}"
    public_path = key_dir / f"{name}{ORG_PUB_SUFFIX}"
    refuse_existing([private_path, public_path], force)
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    write_private(private_path, private)
    write_public(public_path, public + f" silotune-org:{name}\n".encode())
    return OrgKeyFiles(private_path, public_path, public_key_fingerprint(key.public_key()))
