"""Crash-safe round checkpoints for the coordinator.

After every round the coordinator writes the round's whole state here; a
coordinator killed at any moment resumes from ``CheckpointStore.latest()``.

On disk (``root/round-00003/``)::

    adapter_config.json          PEFT's config: the folder *is* a PEFT adapter
    adapter_model.safetensors    the global adapter, keys = PEFT saved-state keys
    run_state.json               JSON: RNG state, metric history, fingerprint, ...
    strategy_state.safetensors   strategy arrays (FedAdam moments...); may hold none
    MANIFEST.json                {"format": 1, "round": 3, "files": {name: {sha256, size}}}

Why it cannot be torn:

* everything is written into ``root/.tmp-round-00003-<pid>-<hex>/``, each file
  fsynced, MANIFEST.json last, then the directory is fsynced and renamed to
  ``round-00003`` in one ``os.rename`` and ``root`` is fsynced. A reader sees
  either no ``round-00003`` or a complete one.
* a reader trusts nothing it has not verified: ``latest()`` checks that the
  manifest exists, that every listed file is there with the listed size and
  sha256, and that the round matches the name; an invalid directory is skipped
  with a warning (logger ``silotune.checkpoint``), so a disk that lied about
  fsync or a bit flip costs one round, not the job.
* ``.tmp-*`` directories are never read; the store removes stale ones on start.

Who can read it: only the coordinator's user. A checkpoint is the whole state
of the job, including the history and (for dp-fedavg) the noised globals of
consecutive rounds, so the root and every round directory (temporary ones
included) are created 0700 and every file 0600 — created with that mode
(``os.open``), never chmod-ed after the bytes are in, so no reader can open it
in between; the umask can only remove bits. A root that already exists with
group/other bits (made by an older silotune, or by hand) is tightened to 0700
before anything is written. The exported specialist and the report are meant
to be shared and keep the default mode (``write_synced``'s default). The
dp-fedavg noise key never comes here: it lives in ``<run-dir>/secrets/``
(server/privacy.py).

Saving a round that is already on disk (a replay after a crash that came
after the rename): if the existing directory is valid and byte-identical
(same manifest entries), it is kept and the new copy discarded, so there is no
moment without a valid ``round-k``. Otherwise (it differs or is corrupt) it is
renamed to ``.old-round-k-...``, the new one renamed into place, and the old
one deleted; if the process dies between those two renames, the next store
start renames the old one back (when it verifies), so nothing valid is lost.

One writer per root: two coordinators writing the same root is not supported.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as st

from runtime.flower_processes import is_alive
from protos.adapter import Adapter, LoraSpec

log = logging.getLogger("silotune.checkpoint")

FORMAT = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_STATE = "run_state.json"
STRATEGY_STATE = "strategy_state.safetensors"
MANIFEST = "MANIFEST.json"
REQUIRED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_STATE, STRATEGY_STATE)

# PEFT and transformers write this header metadata; some loaders check it.
SAFETENSORS_METADATA = {"format": "pt"}

_ROUND_RE = re.compile(r"round-(\d{5,})")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-round-"
# The writer's pid sits before the random suffix: ".tmp-<what>-<pid>-<hex>".
_OWNER_RE = re.compile(r".*-(\d+)-[0-9a-f]+")
_CHUNK = 1 << 20
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
DEFAULT_FILE_MODE = 0o666  # what open() uses; the umask then applies (typically 0644)


class CheckpointCorrupt(RuntimeError):
    """A checkpoint directory that must not be read back, and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"checkpoint {self.path} is unusable: {reason}")


@dataclass(eq=False, repr=False)  # arrays: == is ambiguous and repr would print megabytes
class Checkpoint:
    """The coordinator's whole state after ``round`` (0 = before round 1).

    A Checkpoint returned by ``save`` shares its arrays and run_state with the
    caller (no copy of a possibly large adapter); one returned by ``load`` or
    ``latest`` owns fresh arrays.
    """

    round: int
    adapter: Adapter
    lora: LoraSpec
    base_model: str
    run_state: dict
    strategy_state: dict[str, np.ndarray]
    path: Path

    def __repr__(self) -> str:
        return (
            f"Checkpoint(round={self.round}, path={str(self.path)!r}, "
            f"base_model={self.base_model!r}, lora={self.lora!r}, "
            f"adapter={len(self.adapter)} tensors, "
            f"strategy_state={len(self.strategy_state)} tensors)"
        )


def round_dir_name(round: int) -> str:
    return f"round-{round:05d}"


# ---- serialization helpers (export.py uses them too) -------------------------


def serialize_tensors(tensors: dict[str, np.ndarray], what: str) -> bytes:
    """safetensors bytes for a dict of arrays, dtype and shape kept exactly."""
    clean: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} key {name!r} is not a str")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{what}[{name!r}] is a {type(value).__name__}, not a numpy array")
        # safetensors.numpy copies raw memory from the data pointer: a
        # non-contiguous view (a transpose, a slice) would be written scrambled,
        # without an error. (np.ascontiguousarray would turn 0-d into 1-d.)
        clean[name] = value if value.flags.c_contiguous else np.ascontiguousarray(value)
    return st.save(clean, metadata=SAFETENSORS_METADATA)


def json_bytes(obj: Any) -> bytes:
    # float repr round-trips exactly; allow_nan keeps a diverged NaN loss
    # (Python's json reads NaN back; strict JSON readers would not).
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def write_synced(directory: Path, name: str, data: bytes, *, mode: int = DEFAULT_FILE_MODE) -> dict[str, Any]:
    """Write a new file and fsync it; return its manifest entry.

    The file is created with ``mode`` (less the umask) in the same call that
    creates it: a private file (0600) is never readable by others, not even
    for an instant before a chmod."""
    # O_EXCL: a name collision is a bug, not an overwrite; O_NOFOLLOW: never write through a planted link
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(directory / name, flags, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def private_directory(path: Path) -> bool:
    """Make ``path`` (and missing parents) a directory only its owner can use (0700).

    Created with the mode; an existing one with group/other bits is tightened
    (a directory, before anything private is written into it). Returns
    whether ``path`` was created."""
    path = Path(path)
    created = not path.exists()
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o): tightening it to %o", path, mode, PRIVATE_DIR_MODE)
        os.chmod(path, PRIVATE_DIR_MODE)
    return created


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_json_exact(obj: Any, where: str) -> None:
    """Reject what json would write but not give back equal."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            _check_json_exact(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, item in obj.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} has key {key!r} ({type(key).__name__}): JSON would give it back "
                    "as a str, so run_state would not resume equal; use str keys"
                )
            _check_json_exact(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which does not round-trip through JSON "
        "(tuples come back as lists; numpy scalars, sets and bytes are not JSON): convert it"
    )


def run_state_bytes(run_state: dict) -> bytes:
    if not isinstance(run_state, dict):
        raise TypeError(f"run_state must be a dict, got {type(run_state).__name__}")
    try:
        data = json_bytes(run_state)  # first: catches cycles before the recursive check
    except (TypeError, ValueError) as e:
        raise TypeError(f"run_state is not JSON-able: {e}") from e
    _check_json_exact(run_state, "run_state")
    return data


# ---- verification and loading -------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointCorrupt(path.parent, f"{what} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointCorrupt(path.parent, f"{what} is not valid JSON: {e}") from e


def _verify_file(directory: Path, name: str, entry: Any, keep: bool) -> bytes | None:
    """Check one file against its manifest entry; return its bytes if keep."""
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("sha256"), str)
        or not isinstance(entry.get("size"), int)
    ):
        raise CheckpointCorrupt(directory, f"manifest entry for {name} is malformed: {entry!r}")
    path = directory / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointCorrupt(directory, f"{name} is missing") from None
    if size != entry["size"]:
        raise CheckpointCorrupt(
            directory, f"{name} has {size} bytes, manifest says {entry['size']} (truncated write?)"
        )
    digest = hashlib.sha256()
    chunks: list[bytes] = []
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if keep:
                chunks.append(chunk)
    if digest.hexdigest() != entry["sha256"]:
        raise CheckpointCorrupt(directory, f"{name} sha256 does not match the manifest")
    return b"".join(chunks) if keep else None


def verify_dir(directory: Path, round: int, keep: bool = False) -> tuple[dict, dict[str, bytes]]:
    """Verify a round directory; return its manifest and (if keep) file bytes.

    Raises CheckpointCorrupt for anything a torn or damaged write could leave.
    """
    manifest = _read_json(directory / MANIFEST, MANIFEST + " (the write did not finish)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointCorrupt(directory, f"unknown manifest format in {MANIFEST}")
    if manifest.get("round") != round:
        raise CheckpointCorrupt(
            directory, f"manifest says round {manifest.get('round')!r}, directory name says {round}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointCorrupt(directory, f"{MANIFEST} has no file list")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise CheckpointCorrupt(directory, f"{MANIFEST} does not list {missing}")
    contents: dict[str, bytes] = {}
    for name, entry in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointCorrupt(directory, f"{MANIFEST} lists a bad file name {name!r}")
        data = _verify_file(directory, name, entry, keep)
        if data is not None:
            contents[name] = data
    return manifest, contents


def load_dir(directory: Path, round: int) -> Checkpoint:
    """Verify and load one round directory."""
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"no checkpoint for round {round}", str(directory))
    _, contents = verify_dir(directory, round, keep=True)
    try:
        config = json.loads(contents[ADAPTER_CONFIG])
        lora = LoraSpec.from_peft_config_dict(config)
        base_model = config["base_model_name_or_path"]
        run_state = json.loads(contents[RUN_STATE])
        adapter = st.load(contents[ADAPTER_WEIGHTS])
        strategy_state = st.load(contents[STRATEGY_STATE])
    except Exception as e:  # verified bytes that still do not parse: written by a buggy writer
        raise CheckpointCorrupt(directory, f"verified files do not parse: {e!r}") from e
    if not isinstance(run_state, dict) or not isinstance(base_model, str):
        raise CheckpointCorrupt(directory, "run_state is not an object or base model is not a str")
    return Checkpoint(
        round=round,
        adapter=adapter,
        lora=lora,
        base_model=base_model,
        run_state=run_state,
        strategy_state=strategy_state,
        path=directory,
    )


def _owned_by_other_live_process(name: str) -> bool:
    m = _OWNER_RE.fullmatch(name)
    if m is None:
        return False
    pid = int(m.group(1))
    # Our own pid counts as dead: a restarted container coordinator is often pid 1 again.
    return pid != os.getpid() and is_alive(pid)


def last_valid_round(root: str | Path) -> int:
    """The newest round under ``root`` whose checkpoint verifies, 0 if none — reading only
    (CheckpointStore's constructor creates and recovers): a coordinator asks it to know
    whether a restarted job still has rounds to run, hence organizations to wait for."""
    root = Path(root)
    if not root.is_dir():
        return 0
    for entry in sorted(root.iterdir(), key=lambda e: e.name, reverse=True):
        m = _ROUND_RE.fullmatch(entry.name)
        if not (m and entry.is_dir()):
            continue
        try:
            verify_dir(entry, int(m.group(1)))
        except (CheckpointCorrupt, FileNotFoundError):
            continue
        return int(m.group(1))
    return 0


class CheckpointStore:
    """Round checkpoints under one root; see the module docstring."""

    def __init__(self, root: str | Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        if private_directory(self.root):  # 0700: the checkpoints are the coordinator's alone
            fsync_dir(self.root.parent)
        self._recover()

    # -- reading --

    def _scan(self) -> list[tuple[int, Path]]:
        """round-* directories, newest first (validity not checked)."""
        found = []
        for entry in self.root.iterdir():
            m = _ROUND_RE.fullmatch(entry.name)
            if m and entry.is_dir():
                found.append((int(m.group(1)), entry))
        return sorted(found, reverse=True)

    def latest(self) -> Checkpoint | None:
        """The newest valid checkpoint, or None; invalid ones are skipped with a warning."""
        for k, directory in self._scan():
            try:
                return load_dir(directory, k)
            except CheckpointCorrupt as e:
                log.warning("skipping checkpoint: %s", e)
            except FileNotFoundError:
                continue  # pruned between the scan and the read
        return None

    def load(self, round: int) -> Checkpoint:
        """One round's checkpoint; CheckpointCorrupt if invalid, FileNotFoundError if absent."""
        return load_dir(self.root / round_dir_name(round), round)

    def rounds(self) -> list[int]:
        """Valid completed rounds on disk, ascending."""
        valid = []
        for k, directory in self._scan():
            try:
                verify_dir(directory, k)
            except CheckpointCorrupt as e:
                log.warning("skipping checkpoint: %s", e)
                continue
            valid.append(k)
        return sorted(valid)

    # -- writing --

    def save(
        self,
        round: int,
        adapter: Adapter,
        lora: LoraSpec,
        base_model: str,
        run_state: dict,
        strategy_state: dict[str, np.ndarray] | None = None,
    ) -> Checkpoint:
        """Write round ``round`` atomically, then prune; return it."""
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an int >= 0, got {round!r}")
        if not adapter:
            raise ValueError("refusing to checkpoint an empty adapter")
        strategy_state = {} if strategy_state is None else strategy_state
        # Serialize everything before touching the disk: bad input fails here
        # and leaves the store exactly as it was.
        files = {
            ADAPTER_CONFIG: json_bytes(lora.peft_config_dict(base_model)),
            ADAPTER_WEIGHTS: serialize_tensors(adapter, "adapter"),
            RUN_STATE: run_state_bytes(run_state),
            # safetensors accepts an empty dict (a valid 40-byte file), so no placeholder.
            STRATEGY_STATE: serialize_tensors(strategy_state, "strategy_state"),
        }
        name = round_dir_name(round)
        final = self.root / name
        tmp = self.root / f"{_TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=PRIVATE_DIR_MODE)  # becomes round-k by rename: private from its first byte
        try:
            entries = {fname: write_synced(tmp, fname, data, mode=PRIVATE_FILE_MODE) for fname, data in files.items()}
            manifest = {"format": FORMAT, "round": round, "files": entries}
            # Last: a MANIFEST.json means every file it lists was completely written.
            write_synced(tmp, MANIFEST, json_bytes(manifest), mode=PRIVATE_FILE_MODE)
            fsync_dir(tmp)
            self._install(tmp, final, round, manifest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(round)
        return Checkpoint(
            round=round,
            adapter=adapter,
            lora=lora,
            base_model=base_model,
            run_state=run_state,
            strategy_state=strategy_state,
            path=final,
        )

    def _install(self, tmp: Path, final: Path, round: int, manifest: dict) -> None:
        """Rename the complete tmp dir to its final name (see module docstring)."""
        if not final.exists():
            os.rename(tmp, final)
            fsync_dir(self.root)
            return
        try:
            existing, _ = verify_dir(final, round)
        except CheckpointCorrupt as e:
            log.warning("replacing an unusable checkpoint: %s", e)
            existing = None
        if existing is not None and existing["files"] == manifest["files"]:
            log.info("round %d is already on disk, byte-identical: keeping it", round)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if existing is not None:
            log.warning("replacing checkpoint %s with different content", final)
        aside = self.root / f"{_OLD_PREFIX}{round:05d}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(aside, final)
            raise
        fsync_dir(self.root)
        shutil.rmtree(aside, ignore_errors=True)

    def _prune(self, just_saved: int) -> None:
        """Keep the one just saved and the newest keep_last - 1 valid ones before it.

        Rounds newer than the one just saved come from an earlier run of this
        root (a deliberate rollback); they are left alone but latest() returns
        them, so say so. Invalid dirs newer than the oldest kept one are left
        for inspection; everything older than that is deleted.
        """
        kept = 0
        for k, directory in self._scan():
            if k > just_saved:
                log.warning(
                    "checkpoint %s is newer than the round just saved (%d): latest() returns it",
                    directory, just_saved,
                )
                continue
            if kept < self.keep_last:
                if k == just_saved:
                    kept += 1  # just written and verified by construction
                    continue
                try:
                    verify_dir(directory, k)
                    kept += 1
                except CheckpointCorrupt:
                    pass  # not counted, not deleted: logged whenever latest() reaches it
                continue
            # Rename first so a crash mid-delete leaves a .tmp-* dir (removed on
            # start), never a half-deleted round-* dir.
            doomed = self.root / f"{_TMP_PREFIX}prune-{directory.name}-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.rename(directory, doomed)
            except FileNotFoundError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            log.debug("pruned checkpoint %s", directory)

    def _recover(self) -> None:
        """Clean up after a writer that died: stale .tmp-* dirs, a set-aside old round."""
        for entry in sorted(self.root.iterdir()):
            if not entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                if _ROUND_RE.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink() \
                        and entry.stat().st_mode & 0o077:
                    os.chmod(entry, PRIVATE_DIR_MODE)  # a round written by an older silotune
                continue
            if _owned_by_other_live_process(entry.name):
                log.warning("leaving %s: its writer is still running", entry)
                continue
            if entry.name.startswith(_OLD_PREFIX):
                m = re.match(r"\.old-round-(\d{5,})-", entry.name)
                if m is not None:
                    k = int(m.group(1))
                    final = self.root / round_dir_name(k)
                    if not final.exists():
                        try:
                            verify_dir(entry, k)
                        except CheckpointCorrupt:
                            pass
                        else:
                            # Died between the two renames of a replace: the old copy is the last valid one.
                            os.rename(entry, final)
                            fsync_dir(self.root)
                            log.warning("restored %s from an interrupted replace", final)
                            continue
            log.info("removing leftover %s", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
