"""The value check a strategy runs before it folds an update in
(``Strategy.accumulate_checked``, strategies/checked_sum.py): the norm and the
sums it leaves are codec.check_values's and accumulate's to the bit, on any
number of threads, and a refused update leaves the sums as they were."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from protos import codec
from protos.errors import RejectReason, UpdateRejected
from strategies import build_strategy, checked_sum, kernels
from strategies.checked_sum import checked_norm

CHUNK = codec.CHECK_CHUNK


@pytest.fixture(params=[1, 2, 3, 4])
def threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the test with this many kernel threads, on adapters of any size."""
    monkeypatch.setattr(kernels, "threads", lambda: request.param)
    monkeypatch.setattr(checked_sum, "PARALLEL_MIN", 0)
    return request.param


def _adapter(rng: np.random.Generator, sizes: list[tuple[int, ...]], scale: float = 1.0) -> dict[str, np.ndarray]:
    return {f"t{i}": (scale * rng.standard_normal(shape)).astype(np.float32) for i, shape in enumerate(sizes)}


# odd sizes: empty, below one slice, one slice and one more value, several slices and a tail
SHAPES = [(0, 5), (7,), (CHUNK + 1,), (3, CHUNK - 1), (2 * CHUNK + 17,), (64, 33)]


def test_the_norm_is_check_values_to_the_bit_on_any_number_of_threads(threads: int) -> None:
    rng = np.random.default_rng(11)
    for trial in range(4):
        update = _adapter(rng, SHAPES, scale=10.0 ** (trial - 2))
        reference = _adapter(rng, SHAPES, scale=0.5)
        assert checked_norm(update, reference, None) == codec.check_values(update, reference=reference)
        assert checked_norm(update, None, None) == codec.check_values(update)


def test_the_norm_is_check_values_for_views_and_other_reference_dtypes(threads: int) -> None:
    rng = np.random.default_rng(12)
    wide = rng.standard_normal((CHUNK // 64, 130)).astype(np.float32)
    update = {"view": wide.T, "strided": rng.standard_normal(2 * CHUNK + 9).astype(np.float32)[::2]}
    assert not update["view"].flags.c_contiguous and not update["strided"].flags.c_contiguous
    for dtype in (np.float16, np.float32, np.float64):
        reference = {name: (0.1 * rng.standard_normal(v.shape)).astype(dtype) for name, v in update.items()}
        assert checked_norm(update, reference, None) == codec.check_values(update, reference=reference)


def _fedavg_after(updates: list[dict[str, np.ndarray]], weights: list[int], reference: dict[str, np.ndarray],
                  checked: bool, norm_bound: float | None = None) -> tuple[list[float | str], dict[str, np.ndarray]]:
    """Norms (or rejection reasons) and the raw float64 sums FedAvg holds after these updates."""
    strategy = build_strategy("fedavg")
    strategy.begin_round(1, reference)
    outcomes: list[float | str] = []
    for update, weight in zip(updates, weights):
        try:
            if checked:
                outcomes.append(strategy.accumulate_checked(update, weight, reference=reference,
                                                            norm_bound=norm_bound))
            else:
                outcomes.append(codec.check_values(update, reference=reference, norm_bound=norm_bound))
                strategy.accumulate(update, weight)
        except UpdateRejected as rejection:
            outcomes.append(f"{rejection.reason.value}: {rejection.detail}")
    return outcomes, {name: total.copy() for name, total in strategy.running_sums().items()}


def test_accumulate_checked_is_check_values_then_accumulate_to_the_bit(threads: int) -> None:
    rng = np.random.default_rng(13)
    shapes = [(CHUNK * 2 + 3,), (kernels.LARGE_MIN,), (33, 7)]
    reference = _adapter(rng, shapes)
    updates = [{k: v + _adapter(rng, shapes, 0.01)[k] for k, v in reference.items()} for _ in range(5)]
    weights = [1, 977, 3, kernels.EXACT_WEIGHT - 1, 12]
    fused = _fedavg_after(updates, weights, reference, checked=True)
    separate = _fedavg_after(updates, weights, reference, checked=False)
    assert fused[0] == separate[0]
    for name, total in separate[1].items():
        assert fused[1][name].tobytes() == total.tobytes()


@pytest.mark.parametrize("how", ["nan in the last slice", "inf in the first", "norm just over the bound"])
def test_a_refused_update_leaves_the_sums_bit_identical_with_check_values_reason(how: str, threads: int) -> None:
    rng = np.random.default_rng(14)
    shapes = [(CHUNK + 5,), (3, CHUNK)]
    reference = _adapter(rng, shapes)
    good = {k: v + _adapter(rng, shapes, 0.01)[k] for k, v in reference.items()}
    bad = {k: v + _adapter(rng, shapes, 0.01)[k] for k, v in reference.items()}
    bound = None
    if how == "nan in the last slice":
        bad["t1"][-1, -1] = np.nan
    elif how == "inf in the first":
        bad["t0"][0] = np.inf
    else:
        bound = codec.check_values(bad, reference=reference)
        bound = float(np.nextafter(bound, 0.0))  # the largest bound it does not meet
        assert codec.check_values(good, reference=reference) <= bound
    before = _fedavg_after([good], [5], reference, checked=True, norm_bound=bound)
    after = _fedavg_after([good, bad], [5, 7], reference, checked=True, norm_bound=bound)
    with pytest.raises(UpdateRejected) as expected:
        codec.check_values(bad, reference=reference, norm_bound=bound)
    reason = RejectReason.NORM_BOUND if how.startswith("norm") else RejectReason.NON_FINITE
    assert expected.value.reason is reason
    assert after[0] == [before[0][0], f"{reason.value}: {expected.value.detail}"]
    for name, total in before[1].items():
        assert after[1][name].tobytes() == total.tobytes()


@pytest.mark.parametrize("name", ["fedprox", "fedadam", "fedavgm", "ffa-lora", "median", "krum", "norm-bounded"])
def test_every_strategy_checks_before_it_folds_in(name: str) -> None:
    """A refused update never reaches the strategy; an accepted one gives what accumulate gives."""
    rng = np.random.default_rng(15)
    global_adapter = {f"layers.{i}.q_proj.{factor}.weight": rng.standard_normal((4, 6)).astype(np.float32)
                      for i in range(2) for factor in ("lora_A", "lora_B")}
    share = build_strategy(name).factor_plan["share"]  # what organizations send (ffa-lora: B only)
    reference = {k: v for k, v in global_adapter.items() if any(f".{f}." in k for f in share)}
    updates = [{k: v + np.float32(0.01 * (i + 1)) for k, v in reference.items()} for i in range(3)]
    broken = {k: v.copy() for k, v in updates[0].items()}
    next(iter(broken.values()))[0, 0] = np.nan
    results = []
    for checked in (True, False):
        strategy = build_strategy(name)
        strategy.begin_round(1, global_adapter)
        for update in updates:
            if checked:
                strategy.accumulate_checked(update, 3, reference=reference)
            else:
                strategy.accumulate(update, 3)
        if checked:
            with pytest.raises(UpdateRejected) as info:
                strategy.accumulate_checked(broken, 3, reference=reference)
            assert info.value.reason is RejectReason.NON_FINITE
        results.append(strategy.finish_round())
    for key, value in results[1].items():
        assert results[0][key].tobytes() == value.tobytes()


def test_a_busy_pool_never_stalls_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every pool thread held by other work, the caller sums all the slices
    itself and returns; the same bits as when the pool helps."""
    monkeypatch.setattr(kernels, "threads", lambda: 2)
    monkeypatch.setattr(checked_sum, "PARALLEL_MIN", 0)
    rng = np.random.default_rng(16)
    update, reference = _adapter(rng, SHAPES), _adapter(rng, SHAPES)
    expected = codec.check_values(update, reference=reference)
    release = threading.Event()
    pool = kernels._executor(1)
    held = [pool.submit(release.wait, 30) for _ in range(pool._max_workers)]
    try:
        started = time.monotonic()
        assert checked_norm(update, reference, None) == expected
        assert time.monotonic() - started < 10
    finally:
        release.set()
        for future in held:
            future.result()
    assert checked_norm(update, reference, None) == expected


def _lanes_reference(values: np.ndarray, base: np.ndarray | None) -> float:
    """protos/norm_kernels.py's order of operations, written with numpy: value i into lane i mod 8
    (np.cumsum adds one element after another), the tail into lane 0, then the fixed tree."""
    diff = values if base is None else values - base   # the difference in the inputs' dtype
    squares = diff.astype(np.float64) ** 2
    full = squares.size - squares.size % 8
    lanes = [0.0] * 8
    if full:
        lanes = [float(v) for v in np.cumsum(squares[:full].reshape(-1, 8), axis=0)[-1]]
    for value in squares[full:]:
        lanes[0] += float(value)
    s = lanes
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 1000, CHUNK, 3 * CHUNK + 5])
def test_the_compiled_sum_of_squares_keeps_its_stated_order_to_the_bit(size: int) -> None:
    """Against an independent numpy rendering of the order: a compiler that reordered or fused
    the adds (fast-math, a vectorizer that reassociates) would change the bits."""
    from protos.norm_kernels import slice_sums, sum_of_squares

    rng = np.random.default_rng(size)
    values = (rng.standard_normal(size) * 10.0 ** rng.integers(-20, 20, size)).astype(np.float32)
    base = (rng.standard_normal(size) * 0.3).astype(np.float32)
    assert sum_of_squares(values, base) == _lanes_reference(values, base)
    assert sum_of_squares(values) == _lanes_reference(values, None)
    assert sum_of_squares(values.astype(np.float64)) == _lanes_reference(values.astype(np.float64), None)
    count = -(-size // CHUNK)
    out = np.empty(count)
    slice_sums(values, base, CHUNK, out)
    assert out.tolist() == [_lanes_reference(values[i:i + CHUNK], base[i:i + CHUNK]) for i in range(0, size, CHUNK)]
