"""Named fault-injection points in the coordinator's round loop (tests/faults/ only).

Nothing happens unless the environment variable ``SILOTUNE_FAULT_POINT`` is
set when this module is imported; then ``fault_point`` costs one comparison.
The fault suite sets it for one coordinator process, so that process dies
with SIGKILL at a precise moment of a round — no cleanup, no flush, no
``finally``: what a power cut or the OOM killer does.

    SILOTUNE_FAULT_POINT = NAME[@ROUND][#N]

* NAME: one of ``POINTS``;
* @ROUND: only in that round (default: any round);
* #N: at the N-th time the point is reached in that round (default 1).

With ``SILOTUNE_FAULT_MARK=/some/file`` the process first appends one line
``NAME ROUND PID UNIX-TIME`` to that file (fsynced), so the test knows when
the kill happened and can measure the recovery.

``checkpoint-write`` does not kill at once: it makes the N-th file written
into the round's temporary checkpoint directory the last thing the process
does (#1..#4: data files, #5: the manifest, before the directory is renamed
into place), so a torn checkpoint write is left on disk.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "SILOTUNE_FAULT_POINT"
MARK_ENV = "SILOTUNE_FAULT_MARK"

#: where server/job.py calls fault_point, in the order a round reaches them
POINTS = (
    "sampled",           # organizations sampled, nothing pushed yet
    "after-push",        # train instructions pushed, no reply pulled yet
    "mid-pull",          # the N-th valid update has been folded into the strategy
    "before-aggregate",  # deadline or all replies in, quorum met, finish_round not called
    "after-aggregate",   # new global adapter computed, not evaluated, not on disk
    "mid-evaluate",      # evaluation instructions pushed
    "checkpoint-write",  # inside the checkpoint write (torn write, see above)
    "after-checkpoint",  # the round is on disk, the next one has not started
)


def _parse(spec: str | None) -> tuple[str, int | None, int] | None:
    if not spec:
        return None
    rest, _, count = spec.partition("#")
    name, _, round_text = rest.partition("@")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown point {name!r}; valid: {', '.join(POINTS)}")
    return name, int(round_text) if round_text else None, int(count) if count else 1


_ARMED = _parse(os.environ.get(ENV))
_seen: dict[tuple[str, int | None], int] = {}


def arm(spec: str | None) -> None:
    """Arm (or with None disarm) a fault in this process, as the environment
    variable would: for tests that fork a coordinator instead of exec'ing one."""
    global _ARMED
    _ARMED = _parse(spec)
    _seen.clear()


def fault_point(name: str, server_round: int | None = None) -> None:
    """Die here if the armed fault says so; otherwise return at once."""
    if _ARMED is None:
        return
    armed_name, armed_round, nth = _ARMED
    if name != armed_name or (armed_round is not None and server_round != armed_round):
        return
    key = (name, server_round)
    _seen[key] = _seen.get(key, 0) + 1
    if name == "checkpoint-write":
        _tear_next_checkpoint(nth, server_round)
    elif _seen[key] == nth:
        die(name, server_round)


def die(name: str, server_round: int | None) -> None:
    """Leave a mark (if asked) and SIGKILL this process."""
    mark = os.environ.get(MARK_ENV)
    if mark:
        fd = os.open(mark, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{name} {server_round} {os.getpid()} {time.time():.3f}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # SIGKILL is delivered before this returns; never continue


def _tear_next_checkpoint(nth: int, server_round: int | None) -> None:
    """Kill after the nth file of the next checkpoint write (server.checkpoint.write_synced)."""
    from server import checkpoint

    original = checkpoint.write_synced
    written = [0]

    def write_then_maybe_die(directory, name, data, **kwargs):  # type: ignore[no-untyped-def]
        entry = original(directory, name, data, **kwargs)  # kwargs: the file mode (0600 for checkpoints)
        written[0] += 1
        if written[0] == nth:
            die("checkpoint-write", server_round)
        return entry

    checkpoint.write_synced = write_then_maybe_die  # type: ignore[assignment]
