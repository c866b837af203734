"""The SuperLink's database, paced for many small requests at once (its process only).

Why: every Fleet object request (a SuperNode pushing or pulling one of a
message's objects) costs Flower 1.41's SuperLink three to five SQL
transactions on `state.db`: `check_abort` reads the run's status, and that
read first runs `_cleanup_expired_task_tokens`, two UPDATEs, so a write; then
the object's read or insert; then `store_traffic`, another UPDATE. Each
request runs on its own thread with its own pooled connection, and SQLite
takes one writer at a time: a writer that finds the lock taken sleeps in
SQLite's busy handler, 1, 2, 5, 10, 15, 20, 25 ... 100 ms, however soon the
lock frees. On a localhost deployment that made each object request several
times its cost alone (benchmarks/RESULTS.md, "Deployment overhead, the
SuperLink paced and small messages inline").

Two changes, applied by server/superlink_main.py (the SuperLink that
server/superlink.py starts) before Flower's own `flower-superlink` main runs:

- `serialize_sessions`: one lock for the process around each outermost
  database session (Flower's `SqlMixin.session`; nested sessions in the same
  thread re-enter it). SQLite already runs one writer at a time; now the next
  one starts when the lock is handed over instead of after a busy-handler
  sleep, and the pool reuses one connection instead of opening overflow
  connections (each with its pragmas). Reads in WAL mode could have run
  beside a writer; they are shorter than the sleeps they now avoid. The lock
  is per thread where Flower's session re-entry is per context (a
  ContextVar): a session opened in one thread and continued in another would
  wait on itself. Flower 1.41 has no such path (every session opens and
  closes within one call on one thread); keep it that way here.
  Only the SuperLink's process uses `state.db` (the ServerApp, SuperExec and
  `flwr` CLI go through its APIs), so no other writer is slowed.
- `throttle_status_cleanup`: Flower cleans up expired task tokens (a write)
  before every read of a run's status or info, so every object request
  writes twice. Here a status or info read runs that cleanup at most once per
  `min_interval` (1 s); every other caller (`get_tasks`, `activate_task`,
  `finish_task`, `acknowledge_task_heartbeat`, `store_task_message`,
  `get_task_message`) still runs it first, as Flower does. The cost: a run
  whose ServerApp stopped sending heartbeats (Flower's 30 s interval,
  patience 2) may read as running up to 1 s longer, so for that second its
  messages may still be accepted (`check_abort`) where Flower would already
  refuse them.

Both check first that the installed Flower has what they replace and refuse
to start otherwise (`FlowerPacingUnsupported`, naming it), as the SuperNode's
pacing does (clients/supernode.py). benchmarks/linkstate_requests.py measures
them against Flower as is.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator

from runtime.flower_backoff import FlowerPacingUnsupported

STATUS_CLEANUP_INTERVAL = 1.0  # seconds between two token cleanups that a status read triggers
#: set on each replacement: the Flower function it replaced, so applying a change twice wraps
#: Flower's function again rather than our own replacement (not `__wrapped__`: Flower's
#: `@contextmanager` session already carries one, pointing at its bare generator)
FLOWER_ORIGINAL = "__flower_original__"


def flower_original(function):  # type: ignore[no-untyped-def]
    """The Flower function behind ``function`` (itself when it is Flower's own)."""
    return getattr(function, FLOWER_ORIGINAL, function)


def _require(owner: type, name: str) -> None:
    if not callable(vars(owner).get(name)):  # its own, not an abstract base's
        raise FlowerPacingUnsupported(
            f"{owner.__module__}.{owner.__qualname__}.{name} is missing: the installed Flower is not "
            "the 1.41 this SuperLink pacing was written for (server/linkstate_pacing.py)")


def serialize_sessions() -> threading.RLock:
    """Every outermost `SqlMixin.session` in this process holds one re-entrant lock; returns it."""
    from flwr.supercore.sql_mixin import SqlMixin  # pylint: disable=import-outside-toplevel

    _require(SqlMixin, "session")
    original = flower_original(SqlMixin.session)
    lock = threading.RLock()

    @contextlib.contextmanager
    def session(self) -> Iterator[object]:
        with lock, original(self) as sql_session:
            yield sql_session

    setattr(session, FLOWER_ORIGINAL, original)
    session.__doc__ = original.__doc__
    SqlMixin.session = session  # type: ignore[method-assign]
    return lock


def throttle_status_cleanup(min_interval: float = STATUS_CLEANUP_INTERVAL) -> None:
    """`get_run_status`/`get_run_info` run the expired-token cleanup at most once per
    `min_interval` seconds; every other caller of the cleanup runs it each time."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState  # pylint: disable=import-outside-toplevel
    from flwr.supercore.corestate.sql_corestate import SqlCoreState  # pylint: disable=import-outside-toplevel

    if not (math.isfinite(min_interval) and min_interval > 0):  # nan or inf would switch it off
        raise ValueError(f"min_interval must be a finite number of seconds > 0, got {min_interval}")
    replaced = ((SqlCoreState, "_cleanup_expired_task_tokens"), (SqlLinkState, "get_run_status"),
                (SqlLinkState, "get_run_info"))
    for owner, name in replaced:
        _require(owner, name)
    originals = {name: flower_original(getattr(owner, name)) for owner, name in replaced}
    reading = threading.local()  # set while this thread reads a run's status or info
    last = {"at": float("-inf")}
    last_lock = threading.Lock()

    def cleanup(self) -> None:
        if not getattr(reading, "active", False):
            originals["_cleanup_expired_task_tokens"](self)
            return
        with last_lock:
            began = time.monotonic()
            if began - last["at"] < min_interval:
                return
            last["at"] = began  # stamped first: concurrent status reads do not all clean up at once
        try:
            originals["_cleanup_expired_task_tokens"](self)
        except BaseException:
            last["at"] = float("-inf")  # a cleanup that failed does not count: the next read tries again
            raise

    def read(name: str):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            outer = getattr(reading, "active", False)
            reading.active = True
            try:
                return original(self, *args, **kwargs)
            finally:
                reading.active = outer

        setattr(wrapper, FLOWER_ORIGINAL, original)
        wrapper.__doc__ = original.__doc__
        wrapper.__name__ = name
        return wrapper

    setattr(cleanup, FLOWER_ORIGINAL, originals["_cleanup_expired_task_tokens"])
    SqlCoreState._cleanup_expired_task_tokens = cleanup  # type: ignore[method-assign]
    for owner, name in replaced[1:]:
        setattr(owner, name, read(name))
