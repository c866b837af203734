"""FedAvg against a numerical oracle; streaming, order and state properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from strategies import AggregationError, build_strategy
from strategies.fedavg import FedAvg

SHAPES = {"a.lora_A.weight": (3, 5), "a.lora_B.weight": (5, 3)}


def random_adapter(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def test_weighted_mean_matches_oracle() -> None:
    rng = np.random.default_rng(0)
    updates = [random_adapter(rng) for _ in range(4)]
    weights = [10, 1, 7, 2]
    strategy = FedAvg()
    strategy.begin_round(1, random_adapter(rng))
    for update, n in zip(updates, weights):
        strategy.accumulate(update, n)
    result = strategy.finish_round()
    for name in SHAPES:
        oracle = np.average(np.stack([u[name] for u in updates]).astype(np.float64), axis=0, weights=weights)
        np.testing.assert_allclose(result[name], oracle, rtol=1e-6, atol=1e-7)
        assert result[name].dtype == np.float32


def _fedavg(global_adapter, updates) -> dict:  # type: ignore[no-untyped-def]
    """One FedAvg round over (update, num_examples) pairs, in the order given."""
    strategy = FedAvg()
    strategy.begin_round(1, global_adapter)
    for update, n in updates:
        strategy.accumulate(update, n)
    return strategy.finish_round()


def test_arrival_order_does_not_change_a_bit() -> None:
    rng = np.random.default_rng(1)
    updates = [(random_adapter(rng), int(rng.integers(1, 100))) for _ in range(5)]
    results = [_fedavg(updates[0][0], order) for order in itertools.islice(itertools.permutations(updates), 0, 120, 7)]
    for other in results[1:]:
        for name in SHAPES:
            assert np.array_equal(results[0][name], other[name])


def test_no_update_is_an_error() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, random_adapter(np.random.default_rng(2)))
    with pytest.raises(AggregationError):
        strategy.finish_round()


def test_mismatched_update_is_refused() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, random_adapter(np.random.default_rng(3)))
    with pytest.raises(ValueError):
        strategy.accumulate({"other": np.zeros(1, np.float32)}, 1)
    with pytest.raises(ValueError):
        strategy.accumulate(random_adapter(np.random.default_rng(4)), 0)


def test_registry_lists_valid_choices() -> None:
    assert isinstance(build_strategy("FedAvg"), FedAvg)
    with pytest.raises(ValueError, match="valid: \\[.*'fedavg'"):
        build_strategy("fedmagic")
    with pytest.raises(ValueError, match="no parameter"):
        build_strategy("fedavg", {"mu": 0.1})


def test_fedavg_keeps_no_state() -> None:
    assert FedAvg().state_dict() == {}
    with pytest.raises(ValueError):
        FedAvg().load_state_dict({"m": np.zeros(1)})



# ---- bit-exactness and memory of the streaming sum ---------------------------------------------
from strategies import kernels  # noqa: E402

BIG = kernels.LARGE_MIN  # elements: tensors this large take the compiled pass and may go to threads


def reference_accumulate(total: np.ndarray, values: np.ndarray, weight: int) -> None:
    """total += weight · values in float64: the arithmetic FedAvg must keep, bit for bit
    (a checkpointed coordinator must reproduce results across versions too)."""
    np.add(total, np.multiply(values, weight, dtype=np.float64), out=total)


def test_fedavg_matches_float64_reference_bit_for_bit() -> None:
    rng = np.random.default_rng(13)
    shapes = {"big.lora_A.weight": (8, BIG // 4 + 9), "small.lora_B.weight": (5, 3), "bias": ()}
    global_adapter = {k: np.asarray(rng.normal(size=s), dtype=np.float32) for k, s in shapes.items()}
    updates = [({k: np.asarray(rng.normal(size=s) * 10.0 ** rng.integers(-20, 20), dtype=np.float32)
                 for k, s in shapes.items()}, int(rng.integers(1, 10**6))) for _ in range(9)]
    strategy = FedAvg()
    strategy.begin_round(3, global_adapter)
    sums = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    for update, n in updates:
        strategy.accumulate(update, n)
        for k in shapes:
            reference_accumulate(sums[k], update[k], n)
    weight = float(sum(n for _, n in updates))
    result = strategy.finish_round()
    for k in shapes:
        assert result[k].dtype == np.float32 and result[k].shape == shapes[k]
        assert result[k].tobytes() == (sums[k] / weight).astype(np.float32).tobytes()
    with pytest.raises(AggregationError):  # the round is closed
        strategy.finish_round()


def test_arrival_order_does_not_change_a_bit_on_large_tensors() -> None:
    rng = np.random.default_rng(14)
    shapes = {"w.lora_A.weight": (2, BIG + 77)}
    updates = [({k: (rng.normal(size=s) * 0.05).astype(np.float32) for k, s in shapes.items()},
                int(rng.integers(1, 5000))) for _ in range(6)]
    results = [_fedavg(updates[0][0], order) for order in (updates, updates[::-1], updates[3:] + updates[:3])]
    for other in results[1:]:
        assert all(np.array_equal(results[0][k], other[k]) for k in shapes)


def _peak_rss_probe():
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def reset() -> int:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return status("VmRSS:")

    return reset, lambda: status("VmHWM:")


def test_accumulate_and_finish_add_no_update_sized_temporary() -> None:
    """One 4M-parameter tensor: accumulate must not allocate a float64 copy of the
    update (8·p, what np.multiply(dtype=float64) did); finish_round must not put a
    float64 quotient next to the float64 sum (the old code peaked at +12·p there)."""
    reset, peak = _peak_rss_probe()
    p = 1 << 22
    rng = np.random.default_rng(15)
    global_adapter = {"w": np.zeros(p, np.float32)}
    update = {"w": rng.standard_normal(p, dtype=np.float32)}
    strategy = FedAvg()
    strategy.begin_round(1, global_adapter)
    strategy.accumulate(update, 3)
    strategy.accumulate(update, 4)  # the pair goes in: touches the 32 MB float64 sum
    base = reset()
    strategy.accumulate(update, 5)  # held
    strategy.accumulate(update, 7)  # and folded with this one
    assert peak() - base < 2 * p
    base = reset()
    result = strategy.finish_round()
    assert peak() - base < 6 * p  # the float32 result (4·p), the sum being freed
    assert result["w"].dtype == np.float32


@pytest.mark.parametrize("shape", [(), (1,), (7, 3), (kernels.COMPILED_MIN - 1,), (40, 40), (BIG - 1,), (BIG,), ((1 << 17) * 3,), ((1 << 17) + 1,),
                                   (3, BIG // 2 + 5), (4096, 32)])
def test_add_scaled_is_bit_identical_to_numpy(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(11)
    start = np.asarray(rng.normal(size=shape) * 1e3, dtype=np.float64)
    fused, reference = start.copy(), start.copy()
    for step in range(6):
        # wide dynamic range, subnormals and signed zeros included
        values = np.asarray(rng.normal(size=shape) * 10.0 ** rng.integers(-40, 30), dtype=np.float32)
        if values.size:
            values.reshape(-1)[0] = -0.0
        weight = int(rng.integers(1, kernels.EXACT_WEIGHT)) if step % 2 else step + 1
        kernels.add_scaled(fused, values, weight)
        reference_accumulate(reference, values, weight)
        assert fused.tobytes() == reference.tobytes()


@pytest.mark.parametrize("shape", [(7, 3), (40, 40), (BIG - 1,), (BIG,), (3, BIG // 2 + 5)])
def test_add_scaled_two_is_two_add_scaled_calls_bit_for_bit(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(17)
    start = np.asarray(rng.normal(size=shape) * 1e3, dtype=np.float64)
    paired, reference = start.copy(), start.copy()
    for step in range(4):
        a, b = (np.asarray(rng.normal(size=shape) * 10.0 ** rng.integers(-40, 30), dtype=np.float32)
                for _ in range(2))
        weights = (int(rng.integers(1, kernels.EXACT_WEIGHT)), step + 1)
        kernels.add_scaled_two(paired, a, weights[0], b, weights[1])
        reference_accumulate(reference, a, weights[0])
        reference_accumulate(reference, b, weights[1])
        assert paired.tobytes() == reference.tobytes()
    # one operand off the compiled path (float64 values): still both, in order
    other = rng.normal(size=shape)
    kernels.add_scaled_two(paired, other, 3, a, 2)
    reference_accumulate(reference, other, 3)
    reference_accumulate(reference, a, 2)
    assert paired.tobytes() == reference.tobytes()


@pytest.mark.parametrize("count", [1, 2, 3, 6])
def test_fedavg_folding_updates_two_at_a_time_changes_no_bit(count: int) -> None:
    """FedAvg holds an update until the next one and folds the pair in one pass:
    its sums are those of folding each update as it comes, for odd and even counts."""
    rng = np.random.default_rng(18)
    shapes = {"big.lora_A.weight": (BIG // 16 + 3, 16), "small.lora_B.weight": (5, 4)}
    global_adapter = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    strategy = FedAvg()
    strategy.begin_round(1, global_adapter)
    reference = {k: np.zeros(s) for k, s in shapes.items()}
    for i in range(count):
        update = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        strategy.accumulate(update, 3 + 11 * i)
        for k in shapes:
            reference_accumulate(reference[k], update[k], 3 + 11 * i)
    sums = strategy.running_sums()
    assert all(sums[k].tobytes() == reference[k].tobytes() for k in shapes)
    weight = sum(3 + 11 * i for i in range(count))
    result = strategy.finish_round()
    assert all(np.array_equal(result[k], (reference[k] / weight).astype(np.float32)) for k in shapes)


def test_fedavg_refuses_a_wrongly_shaped_update_when_it_arrives() -> None:
    """The sums take an update later; its shapes are checked when it is handed over."""
    strategy = FedAvg()
    strategy.begin_round(1, {"w": np.zeros((4, 4), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        strategy.accumulate({"w": np.zeros((1, 4), np.float32)}, 2)


def test_add_scaled_other_inputs_keep_numpy_behaviour() -> None:
    rng = np.random.default_rng(12)
    shape = (2, BIG // 2 + 3)  # large enough for the compiled path
    base = rng.normal(size=shape)

    def f32(s=shape):
        return rng.normal(size=s).astype(np.float32)

    readonly = f32()
    readonly.flags.writeable = False
    cases = [
        (readonly, 3),                                         # read-only buffer (compiled path)
        (f32(shape[::-1]).T, 5),                               # non-contiguous
        (rng.normal(size=shape), 7),                           # float64 values
        (rng.normal(size=shape).astype(np.float16), 2),        # float16 values
        (f32((1, shape[1])), 4),                               # broadcasts, as numpy did
        (f32(), kernels.EXACT_WEIGHT + 3),                     # product not exact in float64
        (f32(), 2.5),                                          # non-integer weight
        (f32(), np.int64(9)),
        (f32(), True),
    ]
    for values, weight in cases:
        fused, reference = base.copy(), base.copy()
        kernels.add_scaled(fused, values, weight)
        reference_accumulate(reference, values, weight)
        assert fused.tobytes() == reference.tobytes()
    with pytest.raises(ValueError):
        kernels.add_scaled(base.copy(), np.zeros((3, shape[1]), np.float32), 1)


def test_add_scaled_does_its_arithmetic_on_the_calling_thread() -> None:
    """The kernel must stay on the calling thread: an OpenMP pool (torch's) stalls badly
    when the coordinator shares its cores (simulation), see strategies/kernels.py. (numba
    leaves one idle thread behind after it compiles or loads a kernel: the first call is
    outside the measurement.)"""
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc to see threads")
    code = (
        "import os, threading, numpy as np\n"
        "from strategies.kernels import add_scaled\n"
        "def ticks():\n"
        "    out = {}\n"
        "    for tid in os.listdir('/proc/self/task'):\n"
        "        fields = open(f'/proc/self/task/{tid}/stat').read().rsplit(')', 1)[1].split()\n"
        "        out[int(tid)] = int(fields[11]) + int(fields[12])\n"
        "    return out\n"
        "total = np.zeros(1 << 22)\n"
        "add_scaled(total, np.ones(1 << 22, np.float32), 1)\n"
        "before = ticks()\n"
        "for n in range(40):\n"
        "    add_scaled(total, np.ones(1 << 22, np.float32), n + 2)\n"
        "after = ticks()\n"
        "assert total[0] == sum(range(1, 42))\n"
        "me = threading.get_native_id()\n"
        "others = sum(after[t] - before.get(t, 0) for t in after if t != me)\n"
        "print(after[me] - before[me], others, len(after) - len(before))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    mine, others, new_threads = map(int, out.stdout.split())
    assert new_threads == 0 and mine >= 5 and others <= 1, out.stdout


def test_add_scaled_all_threads_change_no_bit() -> None:
    """An update big enough for add_scaled_all to share its tensors among threads."""
    rng = np.random.default_rng(16)
    count = kernels.PARALLEL_MIN // BIG + 3
    shapes = {f"layer{i}.lora_A.weight": (BIG // 64 + i % 3, 64) for i in range(count)}
    shapes["tiny.bias"] = (7,)
    totals = {k: np.asarray(rng.normal(size=s), dtype=np.float64) for k, s in shapes.items()}
    reference = {k: v.copy() for k, v in totals.items()}
    for weight in (1, 977, kernels.EXACT_WEIGHT - 1):
        values = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        kernels.add_scaled_all(totals, values, weight)
        for k in shapes:
            reference_accumulate(reference[k], values[k], weight)
    assert all(totals[k].tobytes() == reference[k].tobytes() for k in shapes)
    values[next(iter(shapes))] = np.zeros((3, 3), np.float32)  # an error in any thread surfaces
    with pytest.raises(ValueError):
        kernels.add_scaled_all(totals, values, 1)
