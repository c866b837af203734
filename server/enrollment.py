"""Enroll and revoke organizations: register their node keys with a running SuperLink.

How Flower 1.41 does node authentication (read from flwr/cli/supernode/*.py,
flwr/superlink/servicer/*, flwr/supernode/fleet_http_connection.py):

- the SuperLink runs with `--enable-supernode-auth`, which Flower refuses
  without TLS (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`);
- keys are registered at run time through the Control API, on the
  SuperLink's one HTTP port: `flwr supernode register PUBKEY.pub CONNECTION
  [--name ORG] --format json` answers `{"success": true, "node-id": N}`;
  `flwr supernode unregister N CONNECTION` removes it. The CLI connection
  (`$FLWR_HOME/config.toml`) needs `root-certificates = "/abs/ca.pem"` and
  `insecure = false`. `flwr supernode list` shows node IDs but neither names
  nor keys, so the name → node ID map is kept here;
- the key is an OpenSSH ECDSA public key on a NIST curve; the SuperNode
  signs each Fleet request with the matching private key
  (`flower-supernode --auth-supernode-private-key ORG.key`); the SuperLink
  verifies the signature, a fresh timestamp, and that the key is registered.
  An unregistered key is refused at activation ("Failed to activate
  SuperNode", HTTP 412) and the SuperNode exits; self-registration is off. A
  registered node that is unregistered later gets 401 on its next heartbeat
  and shuts down. A revoked key stays in the SuperLink's database (its public
  key column is unique), so it can never be registered again: the
  organization makes a new key pair.
- registrations live in the SuperLink's database (`state.db`), so they
  survive a restart of the coordinator with the same state dir.

Hence enrollment needs a **running** SuperLink: `silotune coordinator
--enroll ORG=PUBKEY` enrolls right after its SuperLink is up and before the
job is submitted (so agents can join at once); `silotune pki enroll
--coordinator-dir STATE_DIR` / `pki revoke` act on a running coordinator at
any time, through the connection it wrote under STATE_DIR/flwr-home.

The registry `STATE_DIR/enrollment.json` (name → node ID, key fingerprint,
times; revoked entries kept for the record) is updated under a file lock,
because the coordinator and `silotune pki enroll` may write it concurrently.

Caveat (Flower 1.41 OSS): the Control API shares the port with the Fleet
API and has no account authentication unless Flower's OIDC plugin is
present, so anyone who can reach the port over TLS can call it (including
`flwr supernode register`). Expose the port only to the organizations'
networks.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from runtime.keys import check_name, load_org_public_key, public_key_fingerprint
from server.superlink import CONNECTION_NAME, FlwrCliError, run_flwr_json

REGISTRY = "enrollment.json"

FlwrJson = Callable[..., dict[str, Any]]  # (*args) -> `flwr ... --format json` output


class EnrollmentError(RuntimeError):
    """Enrolling or revoking an organization failed (named reason in the message)."""


@dataclass
class Enrollment:
    """One organization's registration with the coordinator's SuperLink."""

    name: str
    node_id: int
    fingerprint: str
    public_key: str
    enrolled_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        """True until revoked."""
        return self.revoked_at is None


# ------------------------------------------------------------------ registry
def registry_path(state_dir: Path | str) -> Path:
    """Where the name → node ID map of a coordinator lives."""
    return Path(state_dir).resolve() / REGISTRY


def _lock(state_dir: Path | str) -> FileLock:
    return FileLock(str(registry_path(state_dir)) + ".lock", timeout=60)


def _load(state_dir: Path | str) -> list[Enrollment]:
    path = registry_path(state_dir)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["enrollments"]
        return [Enrollment(**row) for row in rows]
    except (ValueError, KeyError, TypeError) as err:
        raise EnrollmentError(f"enrollment registry {path} is corrupt: {err}") from err


def _save(state_dir: Path | str, rows: Sequence[Enrollment]) -> None:
    path = registry_path(state_dir)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"enrollments": [asdict(r) for r in rows]}, indent=2) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


def enrollments(state_dir: Path | str, *, include_revoked: bool = False) -> list[Enrollment]:
    """The organizations enrolled with this coordinator (active ones unless asked)."""
    rows = _load(state_dir)
    return rows if include_revoked else [r for r in rows if r.active]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ connection
def check_coordinator(state_dir: Path | str) -> Path:
    """The state dir of a coordinator that runs with TLS (and so node auth).

    EnrollmentError if there is no coordinator connection under it, or if
    that coordinator runs `--insecure` (no node authentication to enroll in).
    """
    state_dir = Path(state_dir).resolve()
    config = state_dir / "flwr-home" / "config.toml"
    if not config.is_file():
        raise EnrollmentError(
            f"no coordinator state in {state_dir} ({config} is missing): start "
            f"`silotune coordinator --state-dir {state_dir}` first, or pass its --state-dir"
        )
    try:
        conn = tomllib.loads(config.read_text(encoding="utf-8"))["superlink"][CONNECTION_NAME]
    except (tomllib.TOMLDecodeError, KeyError) as err:
        raise EnrollmentError(f"{config} has no [superlink.{CONNECTION_NAME}] connection") from err
    if conn.get("insecure", False) or not conn.get("root-certificates"):
        raise EnrollmentError(
            f"the coordinator in {state_dir} runs --insecure: it has no node "
            "authentication, so there is nothing to enroll in (restart it without --insecure)"
        )
    return state_dir


def _default_flwr(state_dir: Path) -> FlwrJson:
    def call(*args: str) -> dict[str, Any]:
        return run_flwr_json(state_dir, *args, timeout=90)

    return call


def _explain(err: FlwrCliError, state_dir: Path) -> str:
    text = str(err)
    low = text.lower()
    if "already in use" in low:
        return ("the SuperLink already has this public key registered (enrolled outside "
                "silotune, or revoked: a revoked key cannot be enrolled again)")
    if any(s in low for s in ("connect", "unavailable", "refused", "timed out")):
        return (f"cannot reach the coordinator's SuperLink (is `silotune coordinator "
                f"--state-dir {state_dir}` running?): {text[-500:]}")
    if any(s in low for s in ("certificate", "ssl", "tls")):
        return f"TLS to the coordinator's SuperLink failed: {text[-500:]}"
    return text[-1000:]


# ------------------------------------------------------------------ enroll / revoke
def enroll(
    state_dir: Path | str,
    name: str,
    public_key: Path | str,
    *,
    flwr: FlwrJson | None = None,
) -> Enrollment:
    """Register organization `name`'s public key with the running coordinator.

    Idempotent: enrolling the same name with the same key again returns the
    existing enrollment. A name already enrolled with another key, or a key
    already enrolled under another name, is refused (revoke first).
    """
    check_name(name)
    state_dir = check_coordinator(state_dir)
    key_path = Path(public_key).expanduser().resolve()
    fingerprint = public_key_fingerprint(load_org_public_key(key_path))
    call = flwr or _default_flwr(state_dir)
    with _lock(state_dir):
        rows = _load(state_dir)
        for row in rows:
            if not row.active:
                if row.fingerprint == fingerprint:
                    raise EnrollmentError(
                        f"key {key_path} ({fingerprint}) was revoked on {row.revoked_at} "
                        f"(as {row.name!r}); a revoked key stays revoked (the SuperLink keeps it): "
                        f"the organization makes a new key pair with `silotune pki org-key --force`"
                    )
                continue
            if row.name == name and row.fingerprint == fingerprint:
                return row
            if row.name == name:
                raise EnrollmentError(
                    f"organization {name!r} is already enrolled with another key "
                    f"({row.fingerprint}, node {row.node_id}); revoke it first with "
                    f"`silotune pki revoke --coordinator-dir {state_dir} --name {name}`"
                )
            if row.fingerprint == fingerprint:
                raise EnrollmentError(
                    f"key {key_path} ({fingerprint}) is already enrolled as {row.name!r}; "
                    "each organization needs its own key pair (`silotune pki org-key`)"
                )
        try:
            data = call("supernode", "register", str(key_path), CONNECTION_NAME, "--name", name)
        except FlwrCliError as err:
            raise EnrollmentError(f"enrolling {name!r} failed: {_explain(err, state_dir)}") from err
        row = Enrollment(name=name, node_id=int(data["node-id"]), fingerprint=fingerprint,
                         public_key=str(key_path), enrolled_at=_now())
        rows.append(row)
        _save(state_dir, rows)
        return row


def revoke(
    state_dir: Path | str,
    name: str,
    *,
    flwr: FlwrJson | None = None,
) -> Enrollment:
    """Unregister organization `name` from the running coordinator.

    Its key can no longer connect; a SuperNode connected with it is refused
    at its next heartbeat and shuts down. The registry keeps the entry with
    `revoked_at` set.
    """
    check_name(name)
    state_dir = check_coordinator(state_dir)
    call = flwr or _default_flwr(state_dir)
    with _lock(state_dir):
        rows = _load(state_dir)
        active = [r for r in rows if r.active and r.name == name]
        if not active:
            known = sorted({r.name for r in rows if r.active})
            raise EnrollmentError(f"organization {name!r} is not enrolled with the coordinator "
                                  f"in {state_dir} (enrolled: {known or 'none'})")
        row = active[0]
        try:
            call("supernode", "unregister", str(row.node_id), CONNECTION_NAME)
        except FlwrCliError as err:
            raise EnrollmentError(f"revoking {name!r} (node {row.node_id}) failed: "
                                  f"{_explain(err, state_dir)}") from err
        row.revoked_at = _now()
        _save(state_dir, rows)
        return row


def parse_enroll_arg(text: str) -> tuple[str, Path]:
    """`ORG=PATH` (from `silotune coordinator --enroll`) → (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise EnrollmentError(f"--enroll {text!r}: expected ORG=PUBLIC_KEY_PATH")
    return check_name(name.strip()), Path(path.strip()).expanduser()
