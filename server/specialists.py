"""The specialist registry: every finished job's adapter, named, versioned, immutable.

A job ends with ``<run-dir>/specialist/`` (server/export.py: a PEFT adapter folder with its
model card and provenance.json) and ``<run-dir>/report.json`` (server/report.py). The
coordinator service registers it under a name; each registration of a name is its next
version::

    state_dir/specialists.sqlite             one row per (name, version): what a dashboard lists
    state_dir/specialists/<name>/v<version>/  a copy of the run's specialist/ folder, read-only

Why a registered specialist is never half-written:

* the run's folder is copied into ``specialists/<name>/.tmp-<pid>-<nonce>-<hex>/``, each
  file fsync'd and made read-only (files 0444, the folder 0555) before anything is
  registered; the adapter's sha256 is computed from the copy and must equal provenance's;
* then ONE exclusive SQLite transaction picks the version (max + 1), renames the temporary
  folder to ``v<version>`` (same parent: a read-only directory may be renamed there without
  rewriting its ``..``), fsyncs the parent and inserts the row. A failure before the commit
  removes the folder; the row was never committed;
* a crash between the rename and the commit leaves a ``v<version>`` folder without a row:
  opening the registry removes it, and leftover temporary folders whose writer is gone,
  under the same exclusive lock, so no writer is ever between its rename and its commit
  while this runs.

Rows and folders are never changed afterwards: there is no update method. Registering the
same run twice makes two versions; whether to do so is the caller's decision.

Threads and processes: every call opens its own SQLite connection (WAL mode, a busy
timeout), so one ``SpecialistRegistry`` may be shared by threads, and readers in other
processes (a dashboard) read while a writer registers.

Continued training: a job whose ``init-adapter`` names a registered version starts from it
(``load_init_adapter``, called by server/job.py); ``init_adapter_provenance`` is what the
specialist of such a job records about where it started, and ``register`` reads it back as
the new version's ``parent``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from protos.adapter import LORA_A, LORA_B, Adapter, AdapterFolderError, LoraSpec, read_adapter_folder
from runtime.flower_processes import is_alive
from server.checkpoint import ADAPTER_WEIGHTS, fsync_dir
from server.job_config import JobConfigError

log = logging.getLogger("silotune.specialists")

DATABASE = "specialists.sqlite"
FOLDERS = "specialists"
#: server/export.py's names for what it writes next to the adapter (that module imports the
#: round loop, which imports this one: the names are repeated here; tests/test_specialists.py ties them)
PROVENANCE = "provenance.json"
SPECIALIST_DIR = "specialist"   # server/app.py: <run-dir>/specialist/
REPORT_FILE = "report.json"     # server/report.py: <run-dir>/report.json

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_VERSION_RE = re.compile(r"v([1-9][0-9]*)")
_TMP_PREFIX = ".tmp-"
_TMP_RE = re.compile(r"\.tmp-(\d+)-([0-9a-f]+)-[0-9a-f]+")
#: this process's incarnation: a restarted coordinator may get its old pid back (pid 1 in a
#: container), and its dead predecessor's temporary folders must still count as abandoned
_NONCE = secrets.token_hex(4)
BUSY_TIMEOUT_MS = 30_000
SCHEMA_VERSION = 1
FILE_MODE = 0o444
DIR_MODE = 0o555

_SCHEMA = """
CREATE TABLE IF NOT EXISTS specialists (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    job_id TEXT NOT NULL,
    base_model TEXT NOT NULL,
    task_spec TEXT NOT NULL,
    task_spec_fingerprint TEXT,
    metrics TEXT NOT NULL,
    metric TEXT,
    provenance TEXT NOT NULL,
    epsilon REAL,
    secure_aggregation INTEGER NOT NULL,
    adapter_sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    parent TEXT,
    rounds INTEGER,
    PRIMARY KEY (name, version)
)
"""
_COLUMNS = ("name", "version", "created_at", "job_id", "base_model", "task_spec", "task_spec_fingerprint",
            "metrics", "metric", "provenance", "epsilon", "secure_aggregation", "adapter_sha256", "path",
            "parent", "rounds")
_JSON_COLUMNS = ("task_spec", "metrics", "provenance")


class RegistryError(ValueError):
    """A registration or look-up the registry refuses, and why (names what it knows)."""


@dataclass(frozen=True)
class Specialist:
    """One registered version. Its dicts are the caller's own copies: the registry never changes."""

    name: str
    version: int
    created_at: str                  # UTC, ISO 8601
    job_id: str
    base_model: str                  # provenance's base_model_name_or_path, else the report's model
    task_spec: dict[str, Any]        # provenance's task_spec ({} when the job recorded none)
    task_spec_fingerprint: str | None
    metrics: dict[str, Any]          # the report's "organizations" and "overall" blocks (base/local/specialist)
    metric: str | None               # the report's metric (the job's headline one)
    provenance: dict[str, Any]       # provenance.json as registered
    epsilon: float | None            # differential privacy's ε, None without DP
    secure_aggregation: bool
    adapter_sha256: str
    path: Path                       # the read-only version folder: a PEFT adapter folder
    parent: str | None = None        # "name:version" this one continued from (init-adapter), if registered
    rounds: int | None = None

    @property
    def ref(self) -> str:
        """``name:version``: what ``resolve`` and a job's init-adapter parent take."""
        return f"{self.name}:{self.version}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (for the coordinator service's API and a dashboard)."""
        out = asdict(self)
        out["path"] = str(self.path)
        out["ref"] = self.ref
        return out


def check_name(name: str) -> str:
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise RegistryError(
            f"specialist name {name!r}: expected 1 to 64 characters of a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit (e.g. 'bbc-topics' or 'tax-qa.v2')")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` → (name, None); ``"name:3"`` → (name, 3)."""
    name, sep, version = str(ref).partition(":")
    check_name(name)
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise RegistryError(f"specialist {ref!r}: expected NAME or NAME:VERSION with VERSION >= 1")
    return name, int(version)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class SpecialistRegistry:
    """The registry under ``state_dir``; see the module docstring."""

    def __init__(self, state_dir: str | Path, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.state_dir = Path(state_dir)
        self.folders = self.state_dir / FOLDERS
        self.database = self.state_dir / DATABASE
        self.busy_timeout_ms = busy_timeout_ms
        self.folders.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")   # persistent: readers never wait for a writer
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._remove_unregistered()

    # ---- writing -------------------------------------------------------------
    def register(self, name: str, run_dir: str | Path, *, job_id: str) -> Specialist:
        """Copy ``run_dir/specialist/`` into the registry as the next version of ``name``."""
        check_name(name)
        run_dir = Path(run_dir)
        source, report = self._run_files(run_dir)
        name_dir = self.folders / name
        name_dir.mkdir(parents=True, exist_ok=True)
        tmp = name_dir / f"{_TMP_PREFIX}{os.getpid()}-{_NONCE}-{secrets.token_hex(4)}"
        final: Path | None = None
        try:
            _copy_read_only(source, tmp)
            provenance = _read_json(tmp / PROVENANCE, "provenance")
            sha = file_sha256(tmp / ADAPTER_WEIGHTS)
            if provenance.get("adapter_sha256") not in (None, sha):
                raise RegistryError(
                    f"{source / ADAPTER_WEIGHTS} has sha256 {sha}, its provenance.json says "
                    f"{provenance['adapter_sha256']}: the adapter is not the one the job exported; not registered")
            row = _row(name, job_id, provenance, report, sha)
            with self._connect() as conn:
                conn.execute("BEGIN EXCLUSIVE")
                try:
                    version = conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM specialists WHERE name = ?",
                                           (name,)).fetchone()[0]
                    final = name_dir / f"v{version}"
                    row.update(version=version, path=final.relative_to(self.state_dir).as_posix(),
                               parent=self._parent(conn, provenance))
                    os.rename(tmp, final)
                    fsync_dir(name_dir)
                    fsync_dir(self.folders)
                    self._insert(conn, row)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except BaseException:
            for leftover in (tmp, final):
                if leftover is not None:
                    _remove_tree(leftover)
            raise
        specialist = self._specialist(row)
        log.info("registered %s from %s (job %s)", specialist.ref, run_dir, job_id)
        return specialist

    def _insert(self, conn: sqlite3.Connection, row: dict[str, Any]) -> None:
        values = [json.dumps(row[c]) if c in _JSON_COLUMNS else row[c] for c in _COLUMNS]
        conn.execute(f"INSERT INTO specialists ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                     values)

    def _parent(self, conn: sqlite3.Connection, provenance: dict[str, Any]) -> str | None:
        """The registered version this job started from: the one named in its init-adapter
        provenance if its adapter is the same, else the first with that adapter's sha256."""
        start = provenance.get("init_adapter")
        if not isinstance(start, dict) or not start.get("adapter_sha256"):
            return None
        sha = start["adapter_sha256"]
        named = start.get("specialist")
        name, _, version = str(named or "").partition(":")
        if version.isdigit():
            hit = conn.execute("SELECT 1 FROM specialists WHERE name = ? AND version = ? AND adapter_sha256 = ?",
                               (name, int(version), sha)).fetchone()
            if hit:
                return named
        hit = conn.execute("SELECT name, version FROM specialists WHERE adapter_sha256 = ? ORDER BY rowid LIMIT 1",
                           (sha,)).fetchone()
        return f"{hit[0]}:{hit[1]}" if hit else None

    # ---- reading -------------------------------------------------------------
    def list(self, name: str | None = None) -> list[Specialist]:
        """Every registered version (of ``name``), oldest first, newest last."""
        with self._connect() as conn:
            if name is None:
                rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM specialists ORDER BY rowid").fetchall()
            else:
                rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM specialists WHERE name = ? "
                                    "ORDER BY version", (check_name(name),)).fetchall()
        return [self._specialist(self._decode(r)) for r in rows]

    def names(self) -> list[str]:
        with self._connect() as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT name FROM specialists ORDER BY name")]

    def get(self, name: str, version: int | None = None) -> Specialist:
        """``name``'s ``version``, or its latest when None."""
        check_name(name)
        with self._connect() as conn:
            if version is None:
                row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM specialists WHERE name = ? "
                                   "ORDER BY version DESC LIMIT 1", (name,)).fetchone()
            else:
                row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM specialists WHERE name = ? AND version = ?",
                                   (name, int(version))).fetchone()
            if row is None:
                versions = [r[0] for r in conn.execute(
                    "SELECT version FROM specialists WHERE name = ? ORDER BY version", (name,))]
                if versions:
                    raise RegistryError(f"specialist {name!r} has no version {version}; "
                                        f"it has {', '.join(f'v{v}' for v in versions)}")
                known = [r[0] for r in conn.execute("SELECT DISTINCT name FROM specialists ORDER BY name")]
                raise RegistryError(f"no specialist named {name!r}; registered: "
                                    + (", ".join(known) if known else "none yet"))
        return self._specialist(self._decode(row))

    def resolve(self, ref: str) -> Specialist:
        """``"name"`` (its latest version) or ``"name:3"``."""
        return self.get(*parse_ref(ref))

    # ---- internals -----------------------------------------------------------
    def _connect(self) -> _Connection:
        return _Connection(self.database, self.busy_timeout_ms)

    @staticmethod
    def _decode(row: tuple) -> dict[str, Any]:
        out = dict(zip(_COLUMNS, row))
        for column in _JSON_COLUMNS:
            out[column] = json.loads(out[column])
        return out

    def _specialist(self, row: dict[str, Any]) -> Specialist:
        values = dict(row)
        values["path"] = self.state_dir / values["path"]
        values["secure_aggregation"] = bool(values["secure_aggregation"])
        return Specialist(**values)

    def _run_files(self, run_dir: Path) -> tuple[Path, dict[str, Any]]:
        source = run_dir / SPECIALIST_DIR
        for path in (source / ADAPTER_WEIGHTS, source / PROVENANCE, run_dir / REPORT_FILE):
            if not path.is_file():
                raise RegistryError(f"{run_dir} is not a finished job's run dir: {path.relative_to(run_dir)} "
                                    "is missing (a job writes specialist/ and report.json when it ends)")
        return source, _read_json(run_dir / REPORT_FILE, "report")

    def _remove_unregistered(self) -> None:
        """Temporary folders of writers that are gone, and version folders without a row (a
        crash between rename and commit). Under the exclusive lock: no writer is mid-commit."""
        with self._connect() as conn:
            conn.execute("BEGIN EXCLUSIVE")
            try:
                registered = {row[0] for row in conn.execute("SELECT path FROM specialists")}
                for name_dir in sorted(p for p in self.folders.iterdir() if p.is_dir() and not p.is_symlink()):
                    for entry in sorted(name_dir.iterdir()):
                        if entry.name.startswith(_TMP_PREFIX) and not _writer_alive(entry.name):
                            log.warning("removing %s: a registration that did not finish", entry)
                            _remove_tree(entry)
                        elif (_VERSION_RE.fullmatch(entry.name)
                              and entry.relative_to(self.state_dir).as_posix() not in registered):
                            log.warning("removing %s: its registration was never committed", entry)
                            _remove_tree(entry)
            finally:
                conn.execute("COMMIT")


class _Connection:
    """One short-lived connection: autocommit unless a transaction is begun, closed on exit."""

    def __init__(self, database: Path, busy_timeout_ms: int) -> None:
        self.conn = sqlite3.connect(database, timeout=busy_timeout_ms / 1000, isolation_level=None)
        self.conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RegistryError(f"{path}: the run's {what} cannot be read: {err}") from None
    if not isinstance(value, dict):
        raise RegistryError(f"{path}: the run's {what} is not a JSON object")
    return value


def _row(name: str, job_id: str, provenance: dict[str, Any], report: dict[str, Any], sha: str) -> dict[str, Any]:
    dp = provenance.get("differential_privacy")
    epsilon = dp.get("epsilon") if isinstance(dp, dict) else None
    task_spec = provenance.get("task_spec") if isinstance(provenance.get("task_spec"), dict) else {}
    rounds = report.get("rounds", provenance.get("round"))
    return {
        "name": name,
        "version": None,   # chosen inside the transaction
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "job_id": str(job_id),
        "base_model": str(provenance.get("base_model_name_or_path") or report.get("model") or ""),
        "task_spec": task_spec,
        "task_spec_fingerprint": report.get("task_spec_fingerprint") or task_spec.get("fingerprint"),
        "metrics": {"organizations": report.get("organizations", {}), "overall": report.get("overall", {})},
        "metric": report.get("metric"),
        "provenance": provenance,
        "epsilon": float(epsilon) if isinstance(epsilon, (int, float)) else None,
        "secure_aggregation": bool(provenance.get("secure_aggregation")),
        "adapter_sha256": sha,
        "path": None,
        "parent": None,
        "rounds": int(rounds) if isinstance(rounds, int) else None,
    }


def _walk(root: Path) -> Iterator[Path]:
    for entry in sorted(root.iterdir()):
        yield entry
        if entry.is_dir() and not entry.is_symlink():
            yield from _walk(entry)


def _copy_read_only(source: Path, dest: Path) -> None:
    """Copy a folder's regular files (no links: a link could point anywhere), each fsync'd and
    0444, its folders 0555 once filled; the caller renames ``dest`` into place."""
    dest.mkdir(mode=0o755)
    folders = [dest]
    for entry in _walk(source):
        target = dest / entry.relative_to(source)
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            raise RegistryError(f"{entry} is not a regular file or folder; refusing to register it")
        if entry.is_dir():
            target.mkdir(mode=0o755)
            folders.append(target)
            continue
        with open(entry, "rb") as src, open(target, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(target, FILE_MODE)
    for folder in reversed(folders):   # innermost first: a 0555 folder takes no new entries
        fsync_dir(folder)
        os.chmod(folder, DIR_MODE)


def _remove_tree(path: Path) -> None:
    """Remove a (read-only) folder: its folders must be writable for their entries to go."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        for folder in [path, *(p for p in _walk(path) if p.is_dir() and not p.is_symlink())]:
            os.chmod(folder, stat.S_IRWXU)
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _writer_alive(tmp_name: str) -> bool:
    match = _TMP_RE.fullmatch(tmp_name)
    if match is None:
        return False
    pid, nonce = int(match.group(1)), match.group(2)
    if pid == os.getpid():
        return nonce == _NONCE   # another thread of this process is copying
    return is_alive(pid)


# ---- continued training: a job that starts from a registered specialist ----------------


def adapter_from_peft_state(tensors: dict[str, np.ndarray]) -> Adapter:
    """PEFT's saved-state keys → silotune's adapter names.

    silotune's adapter names *are* PEFT's saved-state keys (protos/adapter.py), and
    server/export.py writes the adapter under them unchanged, so this is the identity for our
    exports and for ``save_pretrained`` folders. It also accepts the in-model names that
    carry PEFT's adapter name (``...q_proj.lora_A.default.weight``), which some tools save.
    """
    adapter: Adapter = {}
    for key, value in tensors.items():
        name = re.sub(rf"\.({LORA_A}|{LORA_B})\.[^.]+\.weight$", r".\1.weight", key)
        if name in adapter:
            raise JobConfigError(f"init-adapter: tensors {key!r} and another one both map to {name!r}")
        adapter[name] = np.ascontiguousarray(value, dtype=np.float32)
    return adapter


def load_init_adapter(folder: str | Path, layout: dict[str, tuple[int, ...]], lora: LoraSpec,
                      fingerprint: str | None = None) -> Adapter:
    """The adapter a job's round 0 starts from, checked against the job: LoRA rank, alpha and
    target modules, the same tensor names and shapes (the first difference is named), finite
    values, the base model's fingerprint when provenance.json records one, and the adapter's
    sha256 when provenance.json records that."""
    folder = Path(folder).expanduser()
    where = f"init-adapter={str(folder)!r}"
    try:
        spec, _, tensors = read_adapter_folder(folder)
    except AdapterFolderError as err:
        raise JobConfigError(f"{where}: {err}") from None
    for what, theirs, ours, key in (("LoRA rank", spec.rank, lora.rank, "lora-r"),
                                    ("LoRA alpha", spec.alpha, lora.alpha, "lora-alpha"),
                                    ("LoRA target modules", spec.target_modules, lora.target_modules,
                                     "lora-targets")):
        if theirs != ours:
            raise JobConfigError(f"{where}: the adapter's {what} is {theirs!r}, this job's ({key}) is {ours!r}; "
                                 "continued training needs the same LoRA shape")
    provenance = _folder_provenance(folder)
    recorded = provenance.get("base_model_fingerprint")
    if fingerprint is not None and recorded not in (None, fingerprint):
        raise JobConfigError(f"{where}: trained on another base model (fingerprint {recorded}), this job's model "
                             f"has {fingerprint}")
    adapter = adapter_from_peft_state(tensors)
    for name in sorted(set(layout) | set(adapter)):
        if name not in adapter:
            raise JobConfigError(f"{where}: the adapter has no tensor {name!r}, which this job's model needs")
        if name not in layout:
            raise JobConfigError(f"{where}: the adapter's tensor {name!r} is not in this job's model "
                                 "(another base model?)")
        if tuple(adapter[name].shape) != tuple(layout[name]):
            raise JobConfigError(f"{where}: tensor {name!r} has shape {tuple(adapter[name].shape)}, this job's "
                                 f"model needs {tuple(layout[name])} (another base model?)")
        if not np.isfinite(adapter[name]).all():
            raise JobConfigError(f"{where}: tensor {name!r} holds non-finite values")
    recorded_sha = provenance.get("adapter_sha256")
    if recorded_sha is not None and recorded_sha != file_sha256(folder / ADAPTER_WEIGHTS):
        raise JobConfigError(f"{where}: {ADAPTER_WEIGHTS} is not the adapter its provenance.json describes "
                             "(sha256 differs)")
    return dict(sorted(adapter.items()))


def init_adapter_provenance(folder: str | Path) -> dict[str, Any]:
    """What a continued job's provenance records about where it started: ``{}`` for a fresh
    adapter, else ``{"init_adapter": {"path", "adapter_sha256", "specialist"?, "job_id"?}}``;
    ``specialist`` is ``name:version`` when the folder is a registry's version folder.
    ``register`` reads it back as the new version's parent."""
    if not folder:
        return {}
    path = Path(folder).expanduser().resolve()
    out: dict[str, Any] = {"path": str(path), "adapter_sha256": file_sha256(path / ADAPTER_WEIGHTS)}
    version = _VERSION_RE.fullmatch(path.name)
    if (version and path.parent.parent.name == FOLDERS and NAME_RE.fullmatch(path.parent.name)
            and (path.parent.parent.parent / DATABASE).is_file()):
        out["specialist"] = f"{path.parent.name}:{version.group(1)}"
    job_id = _folder_provenance(path).get("job_id")
    if job_id is not None:
        out["job_id"] = job_id
    return {"init_adapter": out}


def _folder_provenance(folder: Path) -> dict[str, Any]:
    path = folder / PROVENANCE
    if not path.is_file():
        return {}   # a plain PEFT folder (save_pretrained) has none
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise JobConfigError(f"init-adapter={str(folder)!r}: {path.name} cannot be read: {err}") from None
    return value if isinstance(value, dict) else {}
