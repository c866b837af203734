"""The operator's side of the federation's PKI: the CA and the coordinator's TLS certificate.

Pure `cryptography`; no network. Two separate mechanisms, as in Flower 1.41:

- **TLS** (encryption, and the agents' proof that they talk to the real
  coordinator): a self-signed CA (`ca.pem`, key `ca.key`) signs the
  coordinator's server certificate (`server.pem`, key `server.key`). The
  SuperLink serves it (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`); each
  agent trusts `ca.pem` (`flower-supernode --root-certificates`). TLS is
  server-side only: Flower does not ask SuperNodes for client certificates.
- **Node authentication** (which organizations may join): each organization
  makes its own ECDSA key pair on a NIST curve (`ORG.key`, `ORG.pub`, OpenSSH
  formats, the ones `flower-supernode --auth-supernode-private-key` and
  `flwr supernode register` load); the coordinator registers the public key
  (server/enrollment.py); the SuperNode signs every Fleet request with the
  private key. The private key never leaves the organization.

- **Operator certificates** (who may drive the coordinator's Control API
  from another host): `issue_operator_cert` signs a client certificate
  (`operator-NAME.pem`, key `operator-NAME.key`; EKU clientAuth only) that
  the coordinator's operator listener (server/gateway.py) demands in the TLS
  handshake. Organizations never get one: what they hold (`ca.pem`, their
  OpenSSH node key) cannot complete that handshake.

Only the operator creates the CA, issues the coordinator's certificate and
the operator certificates, and checks the coordinator's files (this module). What an organization needs as
well — loading and verifying certificates, its node key pair, the file rules
(0600 private keys, no silent overwrite) and the Pki* errors — is
runtime/keys.py, which this module builds on.

Layout of a PKI directory (`silotune pki init/server-cert --dir DIR`):

    ca.key      CA private key, PEM PKCS#8, mode 0600 (only needed to issue certificates)
    ca.pem      CA certificate (hand it to every organization)
    server.key  coordinator's TLS key, PEM PKCS#8, mode 0600
    server.pem  coordinator's TLS certificate, SANs = the hosts agents dial + loopback
    operator-NAME.key  an operator's client key, PEM PKCS#8, mode 0600 (`pki operator-cert`)
    operator-NAME.pem  an operator's client certificate (EKU clientAuth), for the operator listener

Every failure is a runtime.keys.PkiError subclass naming the file and what is
wrong with it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from runtime.keys import (
    CURVE,
    PkiError,
    PkiFileMissing,
    PkiKeyMismatch,
    PkiWrongCA,
    check_name,
    check_validity,
    load_ca,
    load_certificate,
    load_pem_private_key,
    refuse_existing,
    utc_now,
    verify_server_cert,
    write_private,
    write_public,
)

CA_KEY = "ca.key"
CA_CERT = "ca.pem"
SERVER_KEY = "server.key"
SERVER_CERT = "server.pem"

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")  # the coordinator's own CLI/ServerApp dial these
CA_DAYS = 3650
SERVER_DAYS = 397  # the longest lifetime browsers accept; renew with `pki server-cert --force`
OPERATOR_DAYS = 90  # an operator certificate is a strong credential with no revocation list: keep it short
OPERATOR_UNIT = "operator"  # organizationalUnitName of every operator certificate
OPERATOR_URI = "urn:silotune:operator:"  # + NAME: the operator certificate's subject alternative name


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class CaFiles:
    """The CA of a federation."""

    key: Path
    cert: Path


@dataclass(frozen=True)
class OperatorFiles:
    """An operator's client certificate for the coordinator's operator listener."""

    ca_cert: Path
    cert: Path
    key: Path
    name: str


@dataclass(frozen=True)
class ServerFiles:
    """What the SuperLink needs for TLS: the CA certificate, its certificate and key."""

    ca_cert: Path
    cert: Path
    key: Path


# ------------------------------------------------------------------ checks
def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    host = host.strip().rstrip(".").lower()
    if not host or not re.match(r"^[a-z0-9*]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$",
                                host):
        raise PkiError(f"{host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def coordinator_files(pki_dir: Path | str, hosts: Sequence[str] = ()) -> ServerFiles:
    """The TLS files `silotune coordinator --pki-dir` needs, all checked.

    Names the first missing file; then verifies the chain, dates, key and
    that the certificate covers `hosts` (the address the coordinator's own
    CLI and ServerApp dial, plus any the caller adds).
    """
    pki_dir = Path(pki_dir).expanduser().resolve()
    files = ServerFiles(pki_dir / CA_CERT, pki_dir / SERVER_CERT, pki_dir / SERVER_KEY)
    hints = {
        files.ca_cert: f"create the federation's CA with `silotune pki init --dir {pki_dir}`",
        files.cert: f"issue it with `silotune pki server-cert --dir {pki_dir} --host HOST`",
        files.key: f"issue it with `silotune pki server-cert --dir {pki_dir} --host HOST`",
    }
    for path, hint in hints.items():
        if not path.is_file():
            raise PkiFileMissing(f"{path} does not exist: {hint} (or pass --insecure "
                                 "to run without TLS and node authentication)")
    verify_server_cert(files.ca_cert, files.cert, files.key, hosts)
    return files


# ------------------------------------------------------------------ issuing
def _name(common_name: str, organization: str = "silotune federation", unit: str | None = None) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        *([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit)] if unit else []),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(
    pki_dir: Path | str,
    *,
    days: int = CA_DAYS,
    common_name: str = "silotune federation CA",
    force: bool = False,
) -> CaFiles:
    """Create the federation's CA: `ca.key` (0600) and a self-signed `ca.pem`."""
    if days < 1:
        raise PkiError(f"--days must be at least 1, not {days}")
    pki_dir = Path(pki_dir).expanduser().resolve()
    files = CaFiles(pki_dir / CA_KEY, pki_dir / CA_CERT)
    refuse_existing([files.key, files.cert], force)
    key = ec.generate_private_key(CURVE())
    subject = _name(common_name)
    now = utc_now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    write_private(files.key, _pem_key(key))
    write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def _leaf_certificate(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                      key: ec.EllipticCurvePrivateKey, subject: x509.Name, names: list[x509.GeneralName],
                      usage: x509.ObjectIdentifier, days: int) -> x509.Certificate:
    """A certificate the CA signs for ``key``: not a CA, signatures only, one extended usage
    (server or client authentication), valid ``days`` but never beyond the CA."""
    now = utc_now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def issue_server_cert(
    pki_dir: Path | str,
    hosts: Sequence[str],
    *,
    days: int = SERVER_DAYS,
    include_loopback: bool = True,
    force: bool = False,
) -> tuple[ServerFiles, list[str]]:
    """Issue `server.key` (0600) + `server.pem` signed by the CA in `pki_dir`.

    `hosts` are the names agents dial: IP addresses become IPAddress SANs,
    names DNSName SANs. With `include_loopback` (default) 127.0.0.1 and
    localhost are added, because the coordinator's own `flwr` CLI and its
    ServerApp process reach the SuperLink over loopback and verify the same
    certificate. Returns the files and the SANs written.
    """
    if days < 1:
        raise PkiError(f"--days must be at least 1, not {days}")
    pki_dir = Path(pki_dir).expanduser().resolve()
    ca_files, ca_cert, ca_key = _load_ca_pair(pki_dir)
    wanted = list(hosts) + (list(LOOPBACK_HOSTS) if include_loopback else [])
    if not wanted:
        raise PkiError("a server certificate needs at least one --host")
    names: list[x509.GeneralName] = []
    for host in wanted:
        name = _general_name(host)
        if name not in names:
            names.append(name)
    files = ServerFiles(ca_files.cert, pki_dir / SERVER_CERT, pki_dir / SERVER_KEY)
    refuse_existing([files.cert, files.key], force)
    key = ec.generate_private_key(CURVE())
    cert = _leaf_certificate(ca_cert, ca_key, key, _name(str(names[0].value)), names,
                             ExtendedKeyUsageOID.SERVER_AUTH, days)
    write_private(files.key, _pem_key(key))
    write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files, [str(n.value) for n in names]


def _load_ca_pair(pki_dir: Path) -> tuple[CaFiles, x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_files = CaFiles(pki_dir / CA_KEY, pki_dir / CA_CERT)
    for path in (ca_files.cert, ca_files.key):
        if not path.is_file():
            raise PkiFileMissing(f"{path} does not exist: create the CA first with "
                                 f"`silotune pki init --dir {pki_dir}`")
    ca_cert = load_ca(ca_files.cert)
    ca_key = load_pem_private_key(ca_files.key, "CA private key")
    if ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise PkiKeyMismatch(f"CA private key {ca_files.key} does not belong to {ca_files.cert}")
    return ca_files, ca_cert, ca_key


def operator_cert_paths(out_dir: Path | str, name: str) -> tuple[Path, Path]:
    """(certificate, key) paths of operator `name` in `out_dir`."""
    out_dir = Path(out_dir).expanduser().resolve()
    return out_dir / f"operator-{name}.pem", out_dir / f"operator-{name}.key"


def issue_operator_cert(
    pki_dir: Path | str,
    name: str,
    *,
    days: int = OPERATOR_DAYS,
    out_dir: Path | str | None = None,
    force: bool = False,
) -> OperatorFiles:
    """Issue operator `name`'s client certificate, signed by the CA in `pki_dir`.

    Writes `operator-NAME.key` (0600) and `operator-NAME.pem` into `out_dir`
    (default `pki_dir`). The certificate says what it is for and nothing
    else: EKU clientAuth only (so it cannot serve TLS, and the server
    certificate, EKU serverAuth, cannot act as an operator), not a CA,
    subject `O=silotune federation, OU=operator, CN=NAME` and subject
    alternative name `urn:silotune:operator:NAME`. The gateway's
    operator listener (server/gateway.py) requires such a certificate in
    the TLS handshake; no organization is ever given one.
    """
    check_name(name)
    if days < 1:
        raise PkiError(f"--days must be at least 1, not {days}")
    pki_dir = Path(pki_dir).expanduser().resolve()
    ca_files, ca_cert, ca_key = _load_ca_pair(pki_dir)
    cert_path, key_path = operator_cert_paths(out_dir or pki_dir, name)
    refuse_existing([cert_path, key_path], force)
    key = ec.generate_private_key(CURVE())
    cert = _leaf_certificate(ca_cert, ca_key, key, _name(name, unit=OPERATOR_UNIT),
                             [x509.UniformResourceIdentifier(OPERATOR_URI + name)],
                             ExtendedKeyUsageOID.CLIENT_AUTH, days)
    write_private(key_path, _pem_key(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return OperatorFiles(ca_files.cert, cert_path, key_path, name)


def operator_name(ca: x509.Certificate, cert: x509.Certificate, at: dt.datetime | None = None) -> str:
    """The operator a client certificate names, after checking it is an operator certificate.

    Issued by `ca`, in its validity period, a leaf (not a CA), EKU clientAuth
    (RFC 5280 client path validation, cryptography's client verifier) and
    OU=operator; PkiError subclasses otherwise. The gateway runs this on
    every operator connection, on top of the TLS handshake's own check.
    """
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise PkiWrongCA(f"certificate {cert.subject.rfc4514_string()!r} was not issued by the "
                         f"federation's CA {ca.subject.rfc4514_string()!r}") from err
    check_validity(cert, cert.subject.rfc4514_string(), "operator certificate", at)
    builder = PolicyBuilder().store(Store([ca]))
    if at is not None:
        builder = builder.time(at)
    try:
        builder.build_client_verifier().verify(cert, [])
    except VerificationError as err:
        raise PkiError(f"certificate {cert.subject.rfc4514_string()!r} is not a client "
                       f"certificate of the federation: {err}") from err
    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    uris = _sans(cert).get_values_for_type(x509.UniformResourceIdentifier)
    names = [u[len(OPERATOR_URI):] for u in uris if u.startswith(OPERATOR_URI)]
    if units != [OPERATOR_UNIT] or len(names) != 1:
        raise PkiError(f"certificate {cert.subject.rfc4514_string()!r} is not an operator "
                       f"certificate (OU={OPERATOR_UNIT}, SAN {OPERATOR_URI}NAME; "
                       "`silotune pki operator-cert`)")
    return check_name(names[0])


def _sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return x509.SubjectAlternativeName([])


def verify_operator_cert(ca_cert: Path | str, cert: Path | str, key: Path | str | None = None,
                         at: dt.datetime | None = None) -> str:
    """Check operator certificate files (and that `key` belongs to `cert`); return the operator's name."""
    ca = load_ca(ca_cert, at)
    certificate = load_certificate(cert, "operator certificate")
    name = operator_name(ca, certificate, at)
    if key is not None:
        private = load_pem_private_key(key, "operator private key")
        if private.public_key().public_numbers() != certificate.public_key().public_numbers():  # type: ignore[union-attr]
            raise PkiKeyMismatch(f"operator private key {key} does not belong to {cert}")
    return name
