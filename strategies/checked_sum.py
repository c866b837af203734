"""The value check of one update (finite, L2 norm of update − reference under
the bound) on all of the kernels' threads, for ``Strategy.accumulate_checked``.

Same bits as ``codec.check_values``: the norm is a sum of per-slice sums
(``codec.slice_squares``) added in the slices' order (``codec.judge_values``).
Here the caller and the kernels' pool threads take the tensors one at a time
from a shared counter (a tensor's slice sums in one compiled call,
``codec.tensor_squares``), each slice's sum goes to its own place, and the
verdict adds them in order on the caller's thread: which thread summed a slice
changes nothing, so the result depends neither on the thread count nor on scheduling,
and a refused update is refused with check_values' reason and message.

Why a pass of its own, before the accumulate, and not one pass that checks and
adds together: the running sums are float64 (P·8 bytes). Adding into them
before the norm is known means taking a refused update out again, and
(t + a) − a is not t in floating point, so the old values would have to be kept
(P·8 bytes); writing total + n·update into a second sum-sized buffer and
swapping it in costs the same P·8 bytes. Either way the coordinator would hold
4·P·4 bytes over its baseline, past its 3·P·4 bound. What moves most is the
float64 sums, read and written (16 bytes a parameter), not the update (4), so
FedAvg saves there instead: it folds two checked updates in one pass over its
sums (strategies/kernels.py ``add_scaled_all_two``). Per parameter and reply:
the norm reads the update and the reference (8), the paired accumulate the
update (4) and half of the sums' 16: 20 bytes, where one fused pass per reply
would move 24 at best.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np

from protos import codec
from protos.adapter import Adapter
from strategies import kernels

#: below this many values in all, one thread, as for the accumulate: on a machine whose
#: cores are busy, waiting for a pool thread the scheduler has not run costs more than
#: a small update's norm
PARALLEL_MIN = kernels.PARALLEL_MIN

_local = threading.local()  # per-thread codec.NormScratch


def _scratch() -> codec.NormScratch:
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = codec.NormScratch()
    return scratch


def checked_norm(update: Adapter, reference: Adapter | None, norm_bound: float | None) -> float:
    """``codec.check_values(update, reference=reference, norm_bound=norm_bound)``,
    bit for bit and with the same rejections, on ``kernels.threads()`` threads."""
    slices = codec.norm_slices(update, reference)
    tensors = codec.norm_tensors(slices)
    partials = [0.0] * len(slices)
    order = itertools.count()  # next() on it is atomic under the GIL: each tensor is taken once

    def work() -> None:
        scratch = _scratch()
        while (i := next(order)) < len(tensors):
            first, flat, base = tensors[i]
            sums = codec.tensor_squares(flat, base, scratch)
            partials[first : first + len(sums)] = sums

    if kernels.threads() == 1 or sum(np.size(values) for values in update.values()) < PARALLEL_MIN:
        work()
    else:
        kernels.run_together(work)
    return codec.judge_values(slices, partials, norm_bound)
