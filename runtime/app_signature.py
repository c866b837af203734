"""The federation's app signature: which Flower App Bundle (FAB) may run inside an organization.

Flower 1.41 verifies a bundle at a SuperNode only through verification records
that the SuperLink attaches to apps fetched from Flower Hub; a bundle submitted
with `flwr run` has none (and a SuperNode with `--trusted-entities` refuses it
outright). So the check is ours, and it lives outside the bundle: code inside
a bundle cannot vouch for itself.

**What is signed.** The federation's publisher key (Ed25519, `silotune pki
app-key`: `publisher.key` 0600, stays with whoever signs; `publisher.pub`
goes to every organization) signs a manifest of the bundle: the sorted list
of (path inside the FAB, sha256 of its bytes) of every file the FAB will
contain. The manifest is computed from the bundle itself, built by Flower's own
builder (`flwr.cli.build.build_fab_from_disk`, the function `flwr run` calls),
so it matches what `flwr run` sends by construction:

- the files are those of the app folder that pass Flower's rules: the
  folder's `.gitignore`, the publish include/exclude patterns, then the FAB
  patterns (`**/*.py|toml|md|yaml|yml|json|jsonl`, `/LICENSE`; no
  `test_*.py`/`*_test.py`, `.venv/`, `__pycache__/`, `build/`, ...) and
  `[tool.flwr.app] fab-include/fab-exclude`;
- `pyproject.toml` as the FAB holds it: re-serialized by Flower (tomli_w)
  without `[tool.flwr.federations]`, so its hash is the bundle's, not the
  folder's;
- left out: `.info/CONTENT` (Flower's own metadata, derived from the other
  files' hashes and deleted by `flwr.cli.install.install_from_fab` before
  the app is installed) and the signature file itself.

The signature is a detached file in the app folder, `silotune-app.sig.json`
(`silotune pki sign-app`); a `.json` name, so Flower's FAB patterns carry it
into the bundle (a `.sig` file would be left behind). Its JSON:
`format`, `algorithm`, `files` (the manifest), `publisher_key` (base64, only
informative: the agent checks against its own copy of the key),
`key_fingerprint` and `signature` (base64 Ed25519 over `signed_bytes(files)`:
the canonical JSON of `{"format", "files"}`).

**What is checked** (`verify_fab`, at the agent before the app is installed,
and `check_app_dir`, at the coordinator before it submits): the bundle is a
zip of regular files with unique names; it carries a signature file
(`unsigned app`); the signature is valid under the publisher key
(`app signature invalid`); every file of the bundle is in the manifest with
its hash (`file X modified`, `file X not signed`) and every file of the
manifest is in the bundle (`file X missing`). Each failure is an AppRejected
subclass whose message starts with that reason.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime.keys import (
    PkiBadKey,
    PkiFileCorrupt,
    check_private_permissions,
    read_file,
    refuse_existing,
    write_private,
    write_public,
)

SIGNATURE_FILE = "silotune-app.sig.json"
FAB_METADATA = (".info/CONTENT",)  # Flower's own manifest: derived, removed before installation
FORMAT = "silotune-app-signature/1"
ALGORITHM = "ed25519"
PUBLISHER_KEY = "publisher.key"
PUBLISHER_PUB = "publisher.pub"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# ------------------------------------------------------------------ errors
class AppRejected(ValueError):
    """An app bundle that must not run here; the message starts with the reason."""


class AppUnsigned(AppRejected):
    """The bundle carries no signature file."""


class AppSignatureInvalid(AppRejected):
    """The signature file is malformed or not signed by the federation's publisher key."""


class AppFileModified(AppRejected):
    """A file's bytes differ from the signed hash."""


class AppFileUnsigned(AppRejected):
    """The bundle holds a file the manifest does not list."""


class AppFileMissing(AppRejected):
    """The manifest lists a file the bundle does not hold."""


class AppBundleInvalid(AppRejected):
    """Not a zip of uniquely named regular files."""


# ------------------------------------------------------------------ keys
@dataclass(frozen=True)
class PublisherKeyFiles:
    private_key: Path
    public_key: Path
    fingerprint: str


def publisher_fingerprint(key: Ed25519PublicKey) -> str:
    """`SHA256:` + unpadded base64 of the sha256 of the raw 32-byte public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def create_publisher_key(key_dir: Path | str, *, force: bool = False) -> PublisherKeyFiles:
    """The federation's app-publisher key pair: `publisher.key` (PEM PKCS#8, 0600), `publisher.pub` (PEM)."""
    key_dir = Path(key_dir)
    private_path, public_path = key_dir / PUBLISHER_KEY, key_dir / PUBLISHER_PUB
    refuse_existing([private_path, public_path], force)
    key = Ed25519PrivateKey.generate()
    write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    public = key.public_key()
    write_public(public_path, public.public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return PublisherKeyFiles(private_path, public_path, publisher_fingerprint(public))


def load_publisher_private_key(path: Path | str, *, check_permissions: bool = True) -> Ed25519PrivateKey:
    what = "app publisher private key"
    data = read_file(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:
        raise PkiFileCorrupt(f"{what} {path} is encrypted; silotune needs it unencrypted") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise PkiFileCorrupt(f"{what} {path} is not a PEM private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise PkiBadKey(f"{what} {path} is a {type(key).__name__}, not an Ed25519 key "
                        "(make one with `silotune pki app-key`)")
    if check_permissions:
        check_private_permissions(path, what)
    return key


def load_publisher_public_key(path: Path | str) -> Ed25519PublicKey:
    what = "app publisher public key"
    data = read_file(path, what)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        hint = " (that is a private key: pass publisher.pub)" if b"PRIVATE KEY" in data else ""
        raise PkiFileCorrupt(f"{what} {path} is not a PEM public key{hint}: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise PkiBadKey(f"{what} {path} is a {type(key).__name__}, not an Ed25519 key "
                        "(make one with `silotune pki app-key`)")
    return key


# ------------------------------------------------------------------ the bundle
def build_fab(app_dir: Path | str) -> bytes:
    """The FAB `flwr run <app_dir>` would send: Flower's own builder, same rules."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


def fab_members(fab: bytes) -> dict[str, bytes]:
    """name -> bytes of every entry; AppBundleInvalid unless a zip of uniquely named regular files."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile as err:
        raise AppBundleInvalid(f"app bundle invalid: not a zip archive ({err})") from None
    members: dict[str, bytes] = {}
    with archive:
        for info in archive.infolist():
            name = info.filename
            kind = stat.S_IFMT(info.external_attr >> 16)
            if info.is_dir() or kind not in (0, stat.S_IFREG):
                raise AppBundleInvalid(f"app bundle invalid: entry {name} is not a regular file")
            if name in members:
                raise AppBundleInvalid(f"app bundle invalid: entry {name} appears twice")
            try:
                members[name] = archive.read(info)
            except (zipfile.BadZipFile, OSError, ValueError) as err:
                raise AppBundleInvalid(f"app bundle invalid: entry {name} cannot be read ({err})") from None
    return members


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(members: dict[str, bytes]) -> list[tuple[str, str]]:
    """The sorted (path, sha256) of every bundle file but the signature and Flower's metadata."""
    return sorted((name, sha256_hex(data)) for name, data in members.items()
                  if name != SIGNATURE_FILE and name not in FAB_METADATA)


def signed_bytes(files: list[tuple[str, str]]) -> bytes:
    """What the publisher key signs: canonical JSON of the format and the manifest."""
    payload = {"format": FORMAT, "files": [[name, digest] for name, digest in files]}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass(frozen=True)
class AppSignature:
    """A parsed signature file (not yet verified)."""

    files: list[tuple[str, str]]
    signature: bytes
    publisher_key: str       # base64 raw key, as the file names it (informative only)
    key_fingerprint: str

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "algorithm": ALGORITHM, "publisher_key": self.publisher_key,
                           "key_fingerprint": self.key_fingerprint,
                           "files": [[name, digest] for name, digest in self.files],
                           "signature": base64.b64encode(self.signature).decode()}, indent=1) + "\n"


def parse_signature(data: bytes) -> AppSignature:
    """The signature file's JSON; AppSignatureInvalid if it is not well formed."""
    def bad(why: str) -> AppSignatureInvalid:
        return AppSignatureInvalid(f"app signature invalid: {SIGNATURE_FILE} {why}")

    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"is not JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("algorithm") != ALGORITHM:
        raise bad(f"is not a {FORMAT} {ALGORITHM} signature")
    raw_files = doc.get("files")
    if not isinstance(raw_files, list):
        raise bad("has no file list")
    files: list[tuple[str, str]] = []
    for entry in raw_files:
        if (not isinstance(entry, list) or len(entry) != 2 or not all(isinstance(x, str) for x in entry)
                or not _SHA256_RE.match(entry[1])):
            raise bad(f"has a malformed file entry {entry!r:.100}")
        files.append((entry[0], entry[1]))
    names = [name for name, _ in files]
    if names != sorted(set(names)):
        raise bad("lists files out of order or twice")
    try:
        signature = base64.b64decode(str(doc.get("signature", "")), validate=True)
    except ValueError:
        raise bad("has a signature that is not base64") from None
    return AppSignature(files, signature, str(doc.get("publisher_key", "")), str(doc.get("key_fingerprint", "")))


def _check_signature(sig: AppSignature, key: Ed25519PublicKey) -> None:
    try:
        key.verify(sig.signature, signed_bytes(sig.files))
    except InvalidSignature:
        expected = publisher_fingerprint(key)
        other = (f"; the bundle names key {sig.key_fingerprint}"
                 if sig.key_fingerprint and sig.key_fingerprint != expected else "")
        raise AppSignatureInvalid(f"app signature invalid: not signed by the federation's publisher key "
                                  f"{expected}{other}") from None


def _compare(members: dict[str, bytes], sig: AppSignature) -> None:
    signed = dict(sig.files)
    problems: list[AppRejected] = []
    for name in sorted(members):
        if name == SIGNATURE_FILE or name in FAB_METADATA:
            continue
        if name not in signed:
            problems.append(AppFileUnsigned(f"file {name} not signed"))
        elif sha256_hex(members[name]) != signed[name]:
            problems.append(AppFileModified(f"file {name} modified"))
    problems += [AppFileMissing(f"file {name} missing") for name in signed if name not in members]
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise type(problems[0])("; ".join(str(p) for p in problems[:5]) + more)


def verify_fab(fab: bytes, key: Ed25519PublicKey) -> AppSignature:
    """Check a bundle against the federation's publisher key; AppRejected (with the reason) if it must not run.

    Nothing of the bundle is executed or written anywhere: it is read from memory.
    """
    members = fab_members(fab)
    if SIGNATURE_FILE not in members:
        raise AppUnsigned(f"unsigned app: the bundle has no {SIGNATURE_FILE} "
                          "(sign the app folder with `silotune pki sign-app`)")
    sig = parse_signature(members[SIGNATURE_FILE])
    _check_signature(sig, key)
    _compare(members, sig)
    return sig


# ------------------------------------------------------------------ the app folder
def sign_app(app_dir: Path | str, private_key: Path | str) -> tuple[Path, AppSignature]:
    """Write `app_dir/silotune-app.sig.json`: the signed manifest of the FAB built from `app_dir`."""
    key = load_publisher_private_key(private_key)
    app_dir = Path(app_dir)
    files = manifest(fab_members(build_fab(app_dir)))
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = AppSignature(files, key.sign(signed_bytes(files)), base64.b64encode(raw).decode(),
                       publisher_fingerprint(public))
    path = write_public(app_dir / SIGNATURE_FILE, sig.to_json().encode("utf-8"))
    return path, sig


def embedded_public_key(sig: AppSignature) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(sig.publisher_key, validate=True))
    except ValueError:
        raise AppSignatureInvalid(f"app signature invalid: {SIGNATURE_FILE} names no valid publisher key") from None


def check_app_dir(app_dir: Path | str, key: Ed25519PublicKey | None = None) -> AppSignature:
    """What an agent will decide about the FAB `flwr run <app_dir>` sends, checked before sending.

    Against `key` if given, else against the key the signature file names (so
    it checks that the folder is unchanged since it was signed; which key the
    agents trust is theirs to say). AppRejected, with how to fix it, if not.
    """
    app_dir = Path(app_dir)
    if not (app_dir / SIGNATURE_FILE).is_file():  # no bundle to build for that
        raise AppUnsigned(f"unsigned app: {app_dir} has no {SIGNATURE_FILE}; sign it with "
                          f"`silotune pki sign-app --key pki/{PUBLISHER_KEY} --app-dir {app_dir}`")
    members = fab_members(build_fab(app_dir))
    if SIGNATURE_FILE not in members:
        raise AppUnsigned(f"unsigned app: {app_dir / SIGNATURE_FILE} exists but Flower leaves it out of "
                          "the bundle (is it in .gitignore or [tool.flwr.app] fab-exclude?)")
    sig = parse_signature(members[SIGNATURE_FILE])
    try:
        _check_signature(sig, key or embedded_public_key(sig))
        _compare(members, sig)
    except AppRejected as err:
        raise type(err)(f"{err} (the app folder {app_dir} no longer matches {SIGNATURE_FILE}: "
                        f"re-sign it with `silotune pki sign-app --app-dir {app_dir}`)") from None
    return sig
