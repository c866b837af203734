"""The float64 multiply-add at the heart of the streaming strategies.

``add_scaled(total, values, weight)`` is ``total += weight * values`` for a float64
``total`` and float32 ``values``, in place, bit-identical to FedAvg's original
``np.add(total, np.multiply(values, weight, dtype=np.float64), out=total)``.

Large tensors (at least ``TORCH_MIN`` elements) go through torch, zero-copy on the
NumPy buffers, in slices of ``CHUNK`` elements: each slice is cast into a
per-thread float64 scratch that stays in L2 (``copy_``), then added with one
vectorized ``add_(scratch, alpha=weight)``. No allocation per call; NumPy's casting
multiply allocates a float64 temporary per tensor and is slower on large tensors.
Small tensors stay on NumPy: there torch's per-call overhead loses.

No OpenMP: torch runs an op of at most 32768 elements (its intra-op grain
size) inline on the calling thread, never on its OpenMP pool. Measured on a
shared 2-core machine, the pool was fastest when idle but made this 17-35× slower
than plain NumPy whenever other processes held the cores (each parallel region
waits for a descheduled thread) —
and a coordinator in simulation shares its cores with training clients
(benchmarks/aggregation.py --kernel-ab). ``add_scaled_all`` instead deals the
large tensors of an update to a few plain Python threads (torch and NumPy
release the GIL while they compute); a thread that is descheduled only delays
its own share, nothing spins. Each tensor is still updated by exactly one
thread, in the same order, so the bits do not change.

Why the bits match: a float32 value times an integer weight below 2**29 is exact
in float64 (24 + 29 bits < 53), so fused or not the only rounding is the
addition's. Anything else (other dtypes, weights, broadcasting shapes,
non-contiguous arrays, no torch) takes the NumPy expression itself.
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np

#: elements per torch call: torch's grain size, so the op runs inline (scratch: 256 KiB)
CHUNK = 1 << 15
#: tensors smaller than this stay on NumPy (torch's per-call overhead dominates)
TORCH_MIN = 1 << 16
#: weights below this make weight × float32 exact in float64
EXACT_WEIGHT = 1 << 29
#: add_scaled_all uses threads when an update has at least this many elements in large tensors
PARALLEL_MIN = 1 << 21
#: at most this many threads (the work is memory-bound: a few cores saturate memory)
MAX_THREADS = 4

_torch: Any = None  # the module once imported, False if unavailable
_readonly_seen = False
_local = threading.local()  # per-thread float64 scratch of CHUNK elements
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0  # a forked child must not reuse its parent's (thread-less) pool
_pool_lock = threading.Lock()


def _load_torch() -> Any:
    global _torch
    if _torch is None:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a project dependency
            _torch = False
        else:
            _torch = torch
    return _torch


def describe() -> str:
    """Which implementation ``add_scaled`` uses here (for benchmark reports)."""
    torch = _load_torch()
    if not torch:
        return "numpy: np.add(total, np.multiply(u, n, dtype=float64), out=total)"
    return (f"numpy below {TORCH_MIN} elements; from there torch {torch.__version__} without OpenMP: "
            f"per slice of {CHUNK}, cast into a float64 scratch then add_(scratch, alpha=n); large tensors "
            f"dealt to {_threads()} Python threads when an update has ≥ {PARALLEL_MIN} such elements")


def _torch_path(total: np.ndarray, values: Any, weight: Any) -> bool:
    return (
        type(values) is np.ndarray
        and values.dtype == np.float32
        and total.dtype == np.float64
        and values.shape == total.shape
        and values.size >= TORCH_MIN
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
    torch = _load_torch() if getattr(values, "size", 0) >= TORCH_MIN else None
    if not torch or not _torch_path(total, values, weight):
        np.add(total, np.multiply(values, weight, dtype=np.float64), out=total)
        return
    global _readonly_seen
    if not values.flags.writeable and not _readonly_seen:
        # torch warns once per process that it cannot mark the tensor read-only;
        # it is only read here
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            source = torch.from_numpy(values)
        _readonly_seen = True
    else:
        source = torch.from_numpy(values)
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = torch.empty(CHUNK, dtype=torch.float64)
    alpha = int(weight)
    for part, piece in zip(torch.from_numpy(total).view(-1).split(CHUNK), source.view(-1).split(CHUNK)):
        buffer = scratch if piece.numel() == CHUNK else scratch[: piece.numel()]
        buffer.copy_(piece)
        part.add_(buffer, alpha=alpha)


def _threads() -> int:
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


def add_scaled_all(totals: Mapping[str, np.ndarray], values: Mapping[str, Any], weight: Any) -> None:
    """``add_scaled(totals[k], values[k], weight)`` for every key of ``totals``.

    When the update is large, its large tensors are shared among up to
    ``MAX_THREADS`` threads (the caller is one of them); same bits as one thread.
    """
    large = [k for k, total in totals.items() if getattr(values[k], "size", 0) >= TORCH_MIN]
    workers = _threads()
    if workers == 1 or sum(totals[k].size for k in large) < PARALLEL_MIN or not _load_torch():
        for name, total in totals.items():
            add_scaled(total, values[name], weight)
        return
    small = [k for k in totals if getattr(values[k], "size", 0) < TORCH_MIN]

    def run(names: list[str]) -> None:
        for name in names:
            add_scaled(totals[name], values[name], weight)

    shares = [large[i::workers] for i in range(workers)]
    futures = [_executor(workers - 1).submit(run, share) for share in shares[1:] if share]
    try:
        run(shares[0] + small)
    finally:
        for future in futures:
            future.result()  # wait for all, re-raise the first error
