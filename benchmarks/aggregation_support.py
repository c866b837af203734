"""Helpers for benchmarks/aggregation.py: adapter layouts, synthetic replies,
peak-memory probes and the memory-bandwidth bound.

Kept apart from the driver so that each case subprocess imports only what it
measures (protos.codec + strategies for ours, flwr's strategy for Flower).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

SEED = 20260611
#: the pool of distinct synthetic replies is at least this big (8 × the 32 MiB L3
#: here), so a reply is never still in cache when it comes round again
POOL_BYTES = 256 << 20


# ---- adapter layouts -----------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """Enough of a decoder's shape for the LoRA q_proj/v_proj adapter."""

    label: str
    description: str
    hidden: int
    kv_out: int  # v_proj output features (num_kv_heads × head_dim, GQA)
    layers: int
    rank: int


#: P ≈ 1.8M: the project's default base model; P ≈ 13.6M: FlowerTune's Mistral-7B r=32 q/v
MODELS = {
    "1.8M": Model("1.8M", "SmolLM2-135M (576 hidden, 30 layers, v 576→192), LoRA r=32 on q_proj+v_proj",
                  576, 192, 30, 32),
    "13.6M": Model("13.6M", "Mistral-7B (4096 hidden, 32 layers, v 4096→1024), LoRA r=32 on q_proj+v_proj",
                   4096, 1024, 32, 32),
}


def layout(model: Model) -> dict[str, tuple[int, ...]]:
    """PEFT state-dict names and shapes: lora_A is (r, in), lora_B is (out, r)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(model.layers):
        for module, out in (("q_proj", model.hidden), ("v_proj", model.kv_out)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (model.rank, model.hidden)
            shapes[f"{prefix}.lora_B.weight"] = (out, model.rank)
    return dict(sorted(shapes.items()))


def num_params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def pool_size(n: int, p: int) -> int:
    """How many distinct replies to pre-generate and cycle through."""
    return min(n, max(4, math.ceil(POOL_BYTES / (4 * p))))


def global_adapter(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {k: (0.02 * rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}


def synthetic_updates(shapes: dict[str, tuple[int, ...]], k: int):
    """Yield k distinct trained adapters (global + a seeded perturbation)."""
    base = global_adapter(shapes)
    for j in range(k):
        rng = np.random.default_rng([SEED, j])
        yield {name: base[name] + np.float32(1e-3) * rng.standard_normal(s, dtype=np.float32)
               for name, s in shapes.items()}


def weights(k: int) -> list[int]:
    """num_examples of pool entry j (reply i uses entry i % k)."""
    rng = np.random.default_rng([SEED, 7])
    return [int(w) for w in rng.integers(50, 5000, size=k)]


def oracle(updates: list[dict[str, np.ndarray]], n: int) -> dict[str, np.ndarray]:
    """Weighted mean of replies 0..n-1 (reply i = pool entry i % k), from the pool."""
    k = len(updates)
    w = weights(k)
    per_entry = np.zeros(k)
    for i in range(n):
        per_entry[i % k] += w[i % k]
    total = per_entry.sum()
    return {name: sum(per_entry[j] * updates[j][name].astype(np.float64) for j in range(k)) / total
            for name in updates[0]}


def max_rel_error(result: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    scale = max(float(np.max(np.abs(v))) for v in expected.values())
    return max(float(np.max(np.abs(result[k].astype(np.float64) - expected[k]))) for k in expected) / scale


# ---- memory probes ---------------------------------------------------------------
_LIBC = None


def trim() -> None:
    """Collect garbage and give free heap pages back to the OS (glibc malloc_trim),
    so that memory freed during set-up cannot be silently reused by the timed part
    without showing up in RSS."""
    global _LIBC
    gc.collect()
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss() -> int:
    return _status("VmRSS:")


class PeakRSS:
    """High-water mark of this process's RSS from ``reset()`` on.

    Linux: writing 5 to /proc/self/clear_refs resets the kernel's peak-RSS counter
    (VmHWM) to the current RSS, and VmHWM is exact (no sampling). Elsewhere, or if
    that is refused, a thread samples RSS every millisecond (may miss short peaks).
    """

    def __init__(self) -> None:
        self.method = "VmHWM after clear_refs"
        self._peak = 0
        self._stop: threading.Event | None = None
        try:
            self._clear()
        except OSError:
            self.method = "psutil RSS sampled every 1 ms"

    @staticmethod
    def _clear() -> None:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")

    def reset(self) -> None:
        if self.method.startswith("VmHWM"):
            self._clear()
            return
        import psutil

        self.stop()
        proc, self._peak, self._stop = psutil.Process(), rss(), threading.Event()

        def sample(stop: threading.Event) -> None:
            while not stop.is_set():
                self._peak = max(self._peak, proc.memory_info().rss)
                time.sleep(0.001)

        threading.Thread(target=sample, args=(self._stop,), daemon=True).start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    def peak(self) -> int:
        if self.method.startswith("VmHWM"):
            return _status("VmHWM:")
        return max(self._peak, rss())


# ---- memory-bandwidth bound --------------------------------------------------------
BOUND_BUFFER_BYTES = 512 << 20  # 16 × L3: reads come from DRAM


def read_bound(total_bytes: int, repeats: int = 3) -> tuple[float, str, float]:
    """Seconds to read ``total_bytes`` once, at the best speed this machine reads.

    Reads consecutive slices of a 512 MiB float32 buffer, cycling through it (a
    slice is never still in cache when it is read again), with np.sum (one
    thread) and torch.sum (all intra-op threads, AVX-512), ``repeats`` times each,
    interleaved; the fastest read counts. Returns (seconds, kernel, GB/s).
    """
    import torch

    buf = np.ones(BOUND_BUFFER_BYTES // 4, dtype=np.float32)
    tbuf = torch.from_numpy(buf)
    slice_elems = 1 << 22  # 16 MiB per call: call overhead < 0.1 %
    kernels = {"np.sum": lambda s, e: buf[s:e].sum(), "torch.sum": lambda s, e: tbuf[s:e].sum()}
    position = 0

    def read(kernel, nbytes: int) -> float:
        nonlocal position
        left = nbytes // 4
        start = time.perf_counter()
        while left > 0:
            take = min(left, slice_elems, buf.size - position)
            kernel(position, position + take)
            position = (position + take) % buf.size
            left -= take
        return time.perf_counter() - start

    for kernel in kernels.values():  # first touch of the pages, thread pool start
        read(kernel, BOUND_BUFFER_BYTES)
    best = {name: float("inf") for name in kernels}
    for _ in range(repeats):
        for name, kernel in kernels.items():
            best[name] = min(best[name], read(kernel, total_bytes))
    name = min(best, key=best.get)
    return best[name], name, total_bytes / best[name] / 1e9


def machine() -> str:
    import platform
    import subprocess

    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.CalledProcessError):
        pass
    import psutil

    cores = os.cpu_count()
    ram = psutil.virtual_memory().total / 2**30
    caches = []
    for key in ("L2 cache", "L3 cache"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
            caches += [line.split(":", 1)[1].strip() + " " + key.split()[0]
                       for line in out.splitlines() if line.startswith(key + ":")]
        except (OSError, subprocess.CalledProcessError):
            pass
    return f"{model}, {cores} cores, {ram:.1f} GiB RAM" + (f" ({', '.join(caches)})" if caches else "")
