"""The float64 multiply-add at the heart of the streaming strategies.

``add_scaled(total, values, weight)`` is ``total += weight * values`` for a float64
``total`` and float32 ``values``, in place, bit-identical to FedAvg's original
``np.add(total, np.multiply(values, weight, dtype=np.float64), out=total)``.

Tensors of at least ``COMPILED_MIN`` elements take one compiled pass
(strategies/sum_kernels.py): widen, multiply, add, element by element — the
expression's very float64 multiply and add, so the same bits for any weight,
without its update-sized float64 temporary. Small tensors take the expression
itself: there the call costs more than the arithmetic.

``add_scaled_two`` folds two updates in one pass over the sums, which halves
what moves most: the float64 sums are read and written once for both (per
parameter 24 bytes for two updates, against 40 in two passes). The result is
that of two ``add_scaled`` calls, a then b, bit for bit.

``add_scaled_all`` / ``add_scaled_all_two`` deal the large tensors of a large
update to a few plain Python threads (the compiled loops release the GIL); a
thread that is descheduled only delays its own share, nothing spins. Each tensor
is still updated by exactly one thread, in the same order, so the bits do not
change. Not torch: its OpenMP pool slows down badly whenever other processes
hold the cores, and a coordinator in simulation shares its cores with training
clients.

Anything else (other dtypes, broadcasting shapes, non-contiguous arrays,
weights that are not positive integers below ``EXACT_WEIGHT``) takes the NumPy
expression itself.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import numpy as np

#: tensors smaller than this take the NumPy expression (there the call costs more than the work)
COMPILED_MIN = 1 << 10
#: tensors at least this large are dealt to threads (``add_scaled_all``)
LARGE_MIN = 1 << 16
#: the compiled path takes integer weights below this (conservative: it rounds exactly
#: as the expression does for any weight; below 2**29 the product itself is exact)
EXACT_WEIGHT = 1 << 29
#: add_scaled_all uses threads when an update has at least this many elements in large tensors
PARALLEL_MIN = 1 << 21
#: at most this many threads (the work is memory-bound: a few cores saturate memory)
MAX_THREADS = 4

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0  # a forked child must not reuse its parent's (thread-less) pool
_pool_lock = threading.Lock()


def describe() -> str:
    """Which implementation ``add_scaled`` uses here (for benchmark reports)."""
    return (f"below {COMPILED_MIN} elements numpy's np.add(total, np.multiply(u, n, dtype=float64), out=total); "
            f"from there one compiled pass per tensor (numba), two updates per pass in FedAvg; large "
            f"tensors dealt to {threads()} Python threads when an update has ≥ {PARALLEL_MIN} such elements")


def _compiled_path(total: np.ndarray, values: Any, weight: Any) -> bool:
    return (
        type(values) is np.ndarray
        and values.dtype == np.float32
        and total.dtype == np.float64
        and values.shape == total.shape
        and values.size >= COMPILED_MIN
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
    if getattr(values, "size", 0) < COMPILED_MIN or not _compiled_path(total, values, weight):
        np.add(total, np.multiply(values, weight, dtype=np.float64), out=total)
        return
    from strategies import sum_kernels  # numba, imported on first use

    sum_kernels.add_one(total.reshape(-1), values.reshape(-1), float(weight))


def add_scaled_two(total: np.ndarray, a: Any, weight_a: Any, b: Any, weight_b: Any) -> None:
    """``add_scaled(total, a, weight_a)`` then ``add_scaled(total, b, weight_b)``, bit for
    bit, in one pass over ``total`` when both take the compiled path."""
    if not (_compiled_path(total, a, weight_a) and _compiled_path(total, b, weight_b)):
        add_scaled(total, a, weight_a)
        add_scaled(total, b, weight_b)
        return
    from strategies import sum_kernels

    sum_kernels.add_two(total.reshape(-1), a.reshape(-1), float(weight_a), b.reshape(-1), float(weight_b))


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
    _for_every_tensor(totals, values, lambda name: add_scaled(totals[name], values[name], weight))


def add_scaled_all_two(totals: Mapping[str, np.ndarray], a: Mapping[str, Any], weight_a: Any,
                       b: Mapping[str, Any], weight_b: Any) -> None:
    """``add_scaled_all(totals, a, weight_a)`` then ``add_scaled_all(totals, b, weight_b)``,
    bit for bit, each tensor's sums crossing memory once for both updates."""
    _for_every_tensor(totals, a, lambda name: add_scaled_two(totals[name], a[name], weight_a, b[name], weight_b))


def _for_every_tensor(totals: Mapping[str, np.ndarray], values: Mapping[str, Any],
                      fold: Callable[[str], None]) -> None:
    """``fold(name)`` for every tensor of ``totals``; the large ones of a large update
    dealt to ``threads()`` threads, each tensor to exactly one."""
    large = [k for k, total in totals.items() if getattr(values[k], "size", 0) >= LARGE_MIN]
    workers = threads()
    if workers == 1 or sum(totals[k].size for k in large) < PARALLEL_MIN:
        for name in totals:
            fold(name)
        return
    small = [k for k in totals if getattr(values[k], "size", 0) < LARGE_MIN]

    def share(names: list[str]) -> Callable[[], None]:
        def run() -> None:
            for name in names:
                fold(name)
        return run

    parts = [large[i::workers] for i in range(workers)]
    parts[0] = parts[0] + small
    run_shares([share(names) for names in parts if names])
