"""The float64 multiply-add at the heart of the streaming strategies.

``add_scaled(total, values, weight)`` is ``total += weight * values`` for a float64
``total`` and float32 ``values``, in place, bit-identical to FedAvg's original
``np.add(total, np.multiply(values, weight, dtype=np.float64), out=total)``.

Large tensors (at least ``LARGE_MIN`` elements) are done in slices of ``CHUNK``
elements through a per-thread float64 scratch (1 MiB, one core's L2 here): cast
the float32 slice into it (``np.copyto``, exact), multiply it in place by the
weight, add it to the sum. Those are the very float64 multiply and add the
expression does per element, so the bits are the same for any weight; only the
update-sized float64 temporary of ``np.multiply(..., dtype=float64)`` is gone.
Three NumPy calls per slice, each releasing the GIL while it runs. Small tensors
take the expression itself.

NumPy rather than torch: the work is bound by memory traffic (≥ 20 bytes per
parameter: read the float32 value, read and write the float64 sum), so what
counts is per-call overhead and GIL hand-offs between threads, which the large
slices keep low; torch's OpenMP pool slows down badly whenever other processes
hold the cores, and a coordinator in simulation shares its cores with training
clients.

``add_scaled_all`` deals the large tensors of a large update to a few plain
Python threads (NumPy releases the GIL while it computes); a thread that is
descheduled only delays its own share, nothing spins. Each tensor is still
updated by exactly one thread, in the same order, so the bits do not change.

Anything else (other dtypes, broadcasting shapes, non-contiguous arrays,
non-integer weights) takes the NumPy expression itself.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import numpy as np

#: elements per slice (float64 scratch: 1 MiB per thread)
CHUNK = 1 << 17
#: tensors smaller than this take the NumPy expression (slicing gains nothing there)
LARGE_MIN = 1 << 16
#: the sliced path takes integer weights below this (a conservative bound: the slices
#: round exactly as the expression does for any weight)
EXACT_WEIGHT = 1 << 29
#: add_scaled_all uses threads when an update has at least this many elements in large tensors
PARALLEL_MIN = 1 << 21
#: at most this many threads (the work is memory-bound: a few cores saturate memory)
MAX_THREADS = 4

_local = threading.local()  # per-thread float64 scratch of CHUNK elements
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0  # a forked child must not reuse its parent's (thread-less) pool
_pool_lock = threading.Lock()


def describe() -> str:
    """Which implementation ``add_scaled`` uses here (for benchmark reports)."""
    return (f"numpy: below {LARGE_MIN} elements np.add(total, np.multiply(u, n, dtype=float64), out=total); "
            f"from there per slice of {CHUNK}: copyto a float64 scratch, multiply by n in place, add; large "
            f"tensors dealt to {threads()} Python threads when an update has ≥ {PARALLEL_MIN} such elements")


def _sliced_path(total: np.ndarray, values: Any, weight: Any) -> bool:
    return (
        type(values) is np.ndarray
        and values.dtype == np.float32
        and total.dtype == np.float64
        and values.shape == total.shape
        and values.size >= LARGE_MIN
        and values.flags.c_contiguous
        and total.flags.c_contiguous
        and total.flags.writeable
        and isinstance(weight, (int, np.integer))
        and not isinstance(weight, (bool, np.bool_))
        and 0 < weight < EXACT_WEIGHT
    )


def add_scaled(total: np.ndarray, values: Any, weight: Any) -> None:
    """``total += weight * values`` in float64, in place.

    Same result, bit for bit, as
    ``np.add(total, np.multiply(values, weight, dtype=np.float64), out=total)``,
    and the same errors for mismatched operands.
    """
    if getattr(values, "size", 0) < LARGE_MIN or not _sliced_path(total, values, weight):
        np.add(total, np.multiply(values, weight, dtype=np.float64), out=total)
        return
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = np.empty(CHUNK, dtype=np.float64)
    flat_total, flat_values = total.reshape(-1), values.reshape(-1)
    size = flat_total.size
    for start in range(0, size, CHUNK):
        stop = min(start + CHUNK, size)
        buffer = scratch[: stop - start]
        np.copyto(buffer, flat_values[start:stop])  # float32 → float64: exact
        np.multiply(buffer, weight, out=buffer)  # the expression's multiply
        part = flat_total[start:stop]
        np.add(part, buffer, out=part)  # and its add


def threads() -> int:
    """How many threads the kernels split large work among here (the caller included)."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, available))


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="silotune-accumulate")
            _pool_pid = os.getpid()
        return _pool


def run_shares(shares: list[Callable[[], None]]) -> None:
    """Run each share on its own thread, the caller taking the first; return when all
    are done, re-raising the first error. Whoever splits the work fixes what each
    share does, so the result cannot depend on which thread ran when."""
    futures = [_executor(max(1, threads() - 1)).submit(share) for share in shares[1:]]
    try:
        if shares:
            shares[0]()
    finally:
        for future in futures:
            future.result()  # wait for all, re-raise the first error


def run_together(work: Callable[[], None]) -> None:
    """Run ``work`` on the caller's thread and, at once, on up to ``threads() − 1``
    pool threads; ``work`` takes its items from a shared counter until none are
    left, so the result must not depend on which thread did which item. A pool
    thread that has not started by the time the caller is done is cancelled: on a
    busy machine the caller loses the help, it never waits for a thread that the
    scheduler has not run yet."""
    helpers = threads() - 1
    futures = [_executor(helpers).submit(work) for _ in range(helpers)]
    try:
        work()
    finally:
        for future in futures:
            if not future.cancel():
                future.result()  # started: wait for its item, re-raise its error


def add_scaled_all(totals: Mapping[str, np.ndarray], values: Mapping[str, Any], weight: Any) -> None:
    """``add_scaled(totals[k], values[k], weight)`` for every key of ``totals``.

    When the update is large, its large tensors are shared among up to
    ``MAX_THREADS`` threads (the caller is one of them); same bits as one thread.
    """
    large = [k for k, total in totals.items() if getattr(values[k], "size", 0) >= LARGE_MIN]
    workers = threads()
    if workers == 1 or sum(totals[k].size for k in large) < PARALLEL_MIN:
        for name, total in totals.items():
            add_scaled(total, values[name], weight)
        return
    small = [k for k in totals if getattr(values[k], "size", 0) < LARGE_MIN]

    def share(names: list[str]) -> Callable[[], None]:
        def run() -> None:
            for name in names:
                add_scaled(totals[name], values[name], weight)
        return run

    parts = [large[i::workers] for i in range(workers)]
    parts[0] = parts[0] + small
    run_shares([share(names) for names in parts if names])
