#!/usr/bin/env python
"""FedAvg aggregation: silotune's streaming FedAvg vs Flower's FedAvg.aggregate_train.

    python benchmarks/aggregation.py              # N ∈ {10,100,1000} × P ∈ {1.8M,13.6M}, 3 repeats
                                                  # (~8 min on an idle 2-core machine, ~15 loaded)
    python benchmarks/aggregation.py --quick      # N ∈ {10,100}, P = 1.8M, 1 repeat (< 1 min)
    python benchmarks/aggregation.py --kernel-ab  # accumulate kernels: numpy and torch variants, idle and busy cores

Every case runs in its own subprocess (this script re-invoked with ``--case``),
so peak memory is that case's alone. What is measured:

* **ours** — what server.job's ``on_reply`` does per reply, less its header
  checks: ``codec.decode(reply.content)`` then
  ``FedAvg.accumulate_checked(update, n, reference=global, norm_bound=…)`` — the
  value checks (finite, norm of update − global under a bound every reply meets)
  and the accumulate — the update dropped right after; plus ``begin_round`` and
  ``finish_round``. After the timed part, the same stages one by one on up to 32
  replies (per-reply table): decode, ``codec.check_values`` (one thread: what
  on_reply ran before ``accumulate_checked``), the norm on the kernels' threads
  (``checked_sum.checked_norm``) and ``accumulate``. Replies are
  Flower RecordDicts built by ``codec.encode`` (fp32). To keep data generation out
  of the measurement, a pool of K distinct replies (K·P·4 ≥ 256 MiB, 8× L3, or
  K = N) is generated before the timed part and reply i is pool entry i mod K.
  Memory: peak RSS over the RSS taken after the global adapter and the pool exist.
* **Flower** — N ``Message`` objects as Flower 1.41's strategy receives them:
  content = RecordDict{"arrays": ArrayRecord, "metrics": MetricRecord{"num-examples"}},
  created with ``Message(content, reply_to=instruction)``; each owns its own array
  bytes (Array(ndarray) = np.save). Timed: ``FedAvg().aggregate_train(1, replies)``.
  Memory: baseline before the replies are built (Flower must hold them all: that
  is its memory cost), reported as replies held + aggregation extra.
* **bound** — in ours's subprocess, after its timed part: the time to read N·P·4
  bytes once: np.sum and torch.sum over a 512 MiB buffer, the fastest of 3 each.

Peak RSS: Linux's VmHWM, reset by writing 5 to /proc/self/clear_refs right before
the measured part (exact, no sampling); malloc_trim(0) before each baseline so that
free heap left over from set-up cannot be reused without showing in RSS.
Cases that cannot fit (``--max-gb``) are reported as skipped with the memory they need.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import aggregation_support as sup  # noqa: E402

KINDS = ("ours", "flower")
#: ours checks every update's norm against this bound (the synthetic deltas' norms are ≤ 4):
#: the comparison runs, and every reply is accepted as in Flower's case
NORM_BOUND = 1e3
#: the target: ours per reply (decode + value checks + accumulate) ≤ Flower's per reply / this
TARGET_RATIO = 5.0
LORA_KW = dict(rank=32, alpha=64.0, target_modules=("q_proj", "v_proj"))


# ---- cases (run inside a subprocess) ---------------------------------------------------------
def case_ours(n: int, label: str) -> dict:
    from protos import codec
    from protos.adapter import LoraSpec
    from strategies.fedavg import FedAvg

    decode = codec.decode
    lora = LoraSpec(**LORA_KW)

    def encode(update, num_examples):
        return codec.encode(update, kind=codec.Kind.Value("UPDATE"), job_id="bench", server_round=1,
                            fingerprint="bench", lora=lora, num_examples=num_examples)

    shapes = sup.layout(sup.MODELS[label])
    p = sup.num_params(shapes)
    k = sup.pool_size(n, p)
    global_adapter = sup.global_adapter(shapes)
    updates = list(sup.synthetic_updates(shapes, k))
    w = sup.weights(k)
    pool = [encode(u, w[j]) for j, u in enumerate(updates)]

    # warm-up: one whole round on the same layout (as in a coordinator's round ≥ 2),
    # so one-time costs (imports, first calls, the allocator's and torch's
    # bookkeeping) are not counted; what it frees is trimmed before the baseline
    warm = FedAvg()
    warm.begin_round(0, global_adapter)
    for j in range(min(2, k)):
        header, update = decode(pool[j])
        warm.accumulate_checked(update, int(header.num_examples), reference=global_adapter, norm_bound=NORM_BOUND)
        del header, update
    warm.finish_round()
    del warm

    probe = sup.PeakRSS()
    sup.trim()
    base = sup.rss()
    probe.reset()
    # ---- timed ----
    cpu = time.process_time()
    start = time.perf_counter()
    strategy = FedAvg()
    strategy.begin_round(1, global_adapter)
    decode_s = checked_s = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        header, update = decode(pool[i % k])
        t1 = time.perf_counter()
        strategy.accumulate_checked(update, int(header.num_examples), reference=global_adapter,
                                    norm_bound=NORM_BOUND)
        t2 = time.perf_counter()
        del header, update  # on_reply drops it the same way
        decode_s += t1 - t0
        checked_s += t2 - t1
    result = strategy.finish_round()
    seconds = time.perf_counter() - start
    cpu_s = time.process_time() - cpu
    # ---- end timed ----
    peak = probe.peak() - base
    probe.stop()
    after = sup.rss() - base
    stages = stage_times(pool, k, min(n, 32), global_adapter)
    error = sup.max_rel_error(result, sup.oracle(updates, n))
    del result, pool
    bound_s, bound_kernel, gbps = sup.read_bound(n * p * 4)
    try:
        from strategies import kernels

        impl = kernels.describe()
    except ImportError:
        impl = "numpy: np.add(total, np.multiply(u, n, dtype=float64), out=total)"
    return dict(seconds=seconds, cpu_s=cpu_s, decode_s=decode_s, checked_s=checked_s, **stages,
                peak_bytes=peak,
                after_bytes=after, base_rss=base, k=k, p=p, rel_error=error, bound_s=bound_s,
                bound_kernel=bound_kernel, bound_gbps=gbps, impl=impl, probe=probe.method)


def stage_times(pool: list, k: int, count: int, global_adapter: dict) -> dict[str, float]:
    """Median ms per reply (wall, and process CPU: all threads) of each stage of
    on_reply's value checks and accumulate, one by one, over ``count`` replies:
    ``check_values`` is the one-thread check on_reply ran before accumulate_checked."""
    from protos import codec
    from strategies.checked_sum import checked_norm
    from strategies.fedavg import FedAvg

    stages = {
        "check_values": lambda update, n: codec.check_values(update, reference=global_adapter, norm_bound=NORM_BOUND),
        "checked_norm": lambda update, n: checked_norm(update, global_adapter, NORM_BOUND),
        "accumulate": lambda update, n: strategy.accumulate(update, n),
    }
    strategy = FedAvg()
    strategy.begin_round(2, global_adapter)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in ("decode", *stages)}
    for i in range(count):
        cpu0, t0 = time.process_time(), time.perf_counter()
        header, update = codec.decode(pool[i % k])
        times["decode"].append((time.perf_counter() - t0, time.process_time() - cpu0))
        for name, stage in stages.items():
            cpu0, t0 = time.process_time(), time.perf_counter()
            stage(update, int(header.num_examples))
            times[name].append((time.perf_counter() - t0, time.process_time() - cpu0))
        del header, update
    out = {}
    for name, pairs in times.items():
        out[f"{name}_ms"] = statistics.median(wall for wall, _ in pairs) * 1e3
        out[f"{name}_cpu_ms"] = statistics.median(cpu for _, cpu in pairs) * 1e3
    return out


def flower_need_bytes(n: int, p: int) -> int:
    """Memory the Flower case needs: N replies held, its float32 sum and a
    temporary, the synthetic pool, the interpreter."""
    k = sup.pool_size(n, p)
    return n * p * 4 + 3 * p * 4 + k * p * 4 + (400 << 20)


def case_flower(n: int, label: str) -> dict:
    import logging

    import numpy as np
    import psutil
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
    from flwr.supercore.task_identity import TaskIdentity

    # what flwr's run_serverapp sets in a ServerApp process; Message() needs it
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one INFO line per call otherwise

    def reply(update, num_examples: int, node_id: int) -> Message:
        content = RecordDict({
            "arrays": ArrayRecord({name: Array(value) for name, value in update.items()}),
            "metrics": MetricRecord({"num-examples": num_examples}),
        })
        instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN, group_id="1")
        return Message(content, reply_to=instruction)

    strategy = FlowerFedAvg()
    shapes = sup.layout(sup.MODELS[label])
    p = sup.num_params(shapes)
    k = sup.pool_size(n, p)
    need = flower_need_bytes(n, p)
    available = psutil.virtual_memory().available
    if need > available - (1 << 30):
        return dict(skipped=f"needs {need / 1e9:.1f} GB, {available / 1e9:.1f} GB available now", p=p)
    updates = list(sup.synthetic_updates(shapes, k))
    w = sup.weights(k)
    # warm-up: one aggregate_train on two replies of the same layout
    strategy.aggregate_train(0, [reply(updates[j % k], w[j % k], 1 + j) for j in range(2)])

    probe = sup.PeakRSS()
    sup.trim()
    base0 = sup.rss()
    probe.reset()
    start = time.perf_counter()
    replies = [reply(updates[i % k], w[i % k], 1000 + i) for i in range(n)]
    build_s = time.perf_counter() - start
    build_peak = probe.peak() - base0
    sup.trim()
    held = sup.rss() - base0
    base1 = sup.rss()
    probe.reset()
    # ---- timed ----
    cpu = time.process_time()
    start = time.perf_counter()
    arrays, _metrics = strategy.aggregate_train(1, replies)
    seconds = time.perf_counter() - start
    cpu_s = time.process_time() - cpu
    # ---- end timed ----
    extra = probe.peak() - base1
    probe.stop()
    del replies
    result = {name: array.numpy() for name, array in arrays.items()}
    error = sup.max_rel_error(result, sup.oracle(updates, n))
    assert all(v.dtype == np.float32 for v in result.values())
    return dict(seconds=seconds, cpu_s=cpu_s, build_s=build_s, held_bytes=held, build_peak_bytes=build_peak,
                agg_extra_bytes=extra, peak_bytes=max(build_peak, held + extra), k=k, p=p,
                rel_error=error, probe=probe.method)


def run_case(kind: str, n: int, label: str) -> dict:
    load = os.getloadavg()[0]
    if kind == "flower":
        result = case_flower(n, label)
    else:
        result = case_ours(n, label)
    result["load"] = max(load, os.getloadavg()[0])
    return result


# ---- accumulate kernels A/B (in-process) ---------------------------------------------------------
def kernel_variants():
    """sums[k] += n·update[k] for every tensor (float64 sums, float32 update): FedAvg's
    numpy expression and the alternatives measured against it. All give the same bits."""
    import threading
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    def numpy_fedavg(sums, update, n):
        for k, total in sums.items():
            np.add(total, np.multiply(update[k], n, dtype=np.float64), out=total)

    def torch_sliced(chunk):
        def run(sums, update, n):
            for k, total in sums.items():
                acc, src = torch.from_numpy(total).view(-1), torch.from_numpy(update[k]).view(-1)
                for a, b in zip(acc.split(chunk), src.split(chunk)):
                    a.add_(b, alpha=n)
        return run

    workers = os.cpu_count() or 1
    pool = ThreadPoolExecutor(workers)
    scratch = threading.local()

    def torch_scratch_threads(sums, update, n):
        # FedAvg's kernel from 7b2d407 to 552b1a0: tensors ≥ 65536 elements in 32768-element
        # slices, copy_ into a float64 scratch then add_(scratch, alpha=n), large tensors
        # dealt round-robin to the threads; smaller ones through the numpy expression
        def one(total, values):
            if values.size < 1 << 16:
                np.add(total, np.multiply(values, n, dtype=np.float64), out=total)
                return
            buffer = getattr(scratch, "torch", None)
            if buffer is None:
                buffer = scratch.torch = torch.empty(1 << 15, dtype=torch.float64)
            for a, b in zip(torch.from_numpy(total).view(-1).split(1 << 15), torch.from_numpy(values).view(-1).split(1 << 15)):
                piece = buffer[: b.numel()]
                piece.copy_(b)
                a.add_(piece, alpha=n)

        large = [k for k in sums if update[k].size >= 1 << 16]
        small = [k for k in sums if update[k].size < 1 << 16]

        def part(names):
            for k in names:
                one(sums[k], update[k])

        futures = [pool.submit(part, large[i::workers]) for i in range(1, workers)]
        part(large[0::workers] + small)
        for future in futures:
            future.result()

    try:
        from strategies import kernels

        def kernel_sums(sums, update, n):
            kernels.add_scaled_all(sums, update, n)
    except ImportError:
        kernel_sums = None

    def numpy_threads(sums, update, n):
        # numpy releases the GIL in its loops; tensors dealt round-robin to the threads
        items = list(sums.items())

        def part(i):
            for k, total in items[i::workers]:
                np.add(total, np.multiply(update[k], n, dtype=np.float64), out=total)

        list(pool.map(part, range(workers)))

    return {
        "numpy expression (FedAvg before 7b2d407)": numpy_fedavg,
        # slices above torch's grain size (32768) run on its OpenMP pool
        f"torch add_, {torch.get_num_threads()} OpenMP threads, 128K slices": torch_sliced(1 << 17),
        # at most the grain size: inline on the calling thread
        "torch add_, 1 thread, 32K slices": torch_sliced(1 << 15),
        f"numpy, {workers} Python threads over tensors": numpy_threads,
        f"torch copy_ + add_, 32K slices, {workers} Python threads (FedAvg 7b2d407-552b1a0)": torch_scratch_threads,
        **({"strategies.kernels.add_scaled_all (FedAvg)": kernel_sums} if kernel_sums else {}),
    }


def kernel_ab(labels: list[str], rounds: int = 7, per_round: int = 8) -> str:
    """Per-update accumulate time of each kernel, interleaved in one process, median
    of rounds; then again while one busy-looping process per core competes (what a
    coordinator sees in simulation, next to training clients)."""
    import numpy as np

    variants = kernel_variants()
    names = list(variants)
    lines = ["| P | other load | " + " | ".join(f"{v}, ms/update" for v in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for busy in (0, os.cpu_count() or 1):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            for label in labels:
                shapes = sup.layout(sup.MODELS[label])
                updates = list(sup.synthetic_updates(shapes, 4))
                sums = {v: {k: np.zeros(s) for k, s in shapes.items()} for v in names}
                times: dict[str, list[float]] = {v: [] for v in names}
                for v in names:  # warm-up
                    variants[v](sums[v], updates[0], 3)
                for r in range(rounds):
                    for v in (names if r % 2 == 0 else names[::-1]):
                        start = time.perf_counter()
                        for i in range(per_round):
                            variants[v](sums[v], updates[i % 4], 1 + i)
                        times[v].append((time.perf_counter() - start) / per_round * 1e3)
                for v in names[1:]:
                    assert all(sums[v][k].tobytes() == sums[names[0]][k].tobytes() for k in shapes)
                cells = " | ".join(f"{statistics.median(times[v]):.2f}" for v in names)
                lines.append(f"| {label} ({len(shapes)} tensors) | {busy} busy-loop processes "
                             f"(load {os.getloadavg()[0]:.1f}) | {cells} |")
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    return "\n".join(lines)


# ---- driver ---------------------------------------------------------------------------------------
def spawn(kind: str, n: int, label: str, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", kind, "--n", str(n), "--p", label]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"case {kind} N={n} P={label} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def mb(x: float) -> str:
    return f"{x / 1e6:,.0f}" if x >= 10e6 else f"{x / 1e6:.1f}"


def summarize(runs: list[dict]) -> dict:
    """Median of the repeats; the bound is a best-case figure, so its minimum."""
    if not runs:
        return {}
    if "skipped" in runs[0]:
        return runs[0]
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs]
            out[key] = min(values) if key in ("bound_s",) else statistics.median(values)
    out["bound_gbps"] = max(r.get("bound_gbps", 0) for r in runs)
    out["repeats"] = len(runs)
    out["seconds_all"] = [round(r["seconds"], 3) for r in runs]
    return out


def table(results: dict, ns: list[int], labels: list[str]) -> tuple[str, list[str], bool]:
    head = ("| N | P | ours s (decode + checked accumulate) | ours MB over baseline (×P·4 B) | Flower s "
            "| Flower MB: replies held + aggregation extra | speedup | bound s (GB/s) | ours / bound |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    targets: list[str] = []
    all_met = True
    for label in labels:
        peaks = {}
        for n in ns:
            o, f = (results.get((kind, n, label), {}) for kind in KINDS)
            if not o:
                continue
            p = o["p"]
            unit = 4 * p
            peaks[n] = o["peak_bytes"]
            ours = f"{o['seconds']:.3f} ({o['decode_s']:.3f} + {o['checked_s']:.3f}) [cpu {o['cpu_s']:.3f}]"
            mem = f"{mb(o['peak_bytes'])} ({o['peak_bytes'] / unit:.2f})"
            if not f:
                fl = fmem = speed = "not run"
            elif "skipped" in f:
                fl, fmem, speed = f"skipped: {f['skipped']}", "—", "—"
            else:
                fl = f"{f['seconds']:.3f} [cpu {f['cpu_s']:.3f}]"
                fmem = f"{mb(f['held_bytes'])} + {mb(f['agg_extra_bytes'])} (peak {mb(f['peak_bytes'])})"
                speed = f"{f['seconds'] / o['seconds']:.2f}× [cpu {f['cpu_s'] / o['cpu_s']:.2f}×]"
            bound = f"{o['bound_s']:.3f} ({o['bound_gbps']:.0f})"
            ratio = f"{o['seconds'] / o['bound_s']:.1f}×"
            rows.append(f"| {n} | {label} ({p:,}) | {ours} | {mem} | {fl} | {fmem} | {speed} | {bound} | {ratio} |")
        if peaks:
            unit = 4 * results[("ours", ns[0], label)]["p"] if ("ours", ns[0], label) in results else 1
            worst = max(peaks.values())
            flat = max(peaks.values()) - min(peaks.values()) <= 0.1 * unit
            ok = worst <= 3 * unit and flat
            all_met &= ok
            targets.append(
                f"- memory, P={label}: peak over baseline {', '.join(f'N={n}: {peaks[n] / unit:.3f}·P·4' for n in peaks)}; "
                f"limit 3·P·4 = {mb(3 * unit)} MB → {'met' if worst <= 3 * unit else 'MISSED'}; "
                f"flat in N (spread ≤ 0.1·P·4): {'yes' if flat else 'NO'} "
                f"(spread {(max(peaks.values()) - min(peaks.values())) / 1e6:.2f} MB)")
    key = ("ours", 100, "13.6M")
    if key in results and ("flower", 100, "13.6M") in results and "skipped" not in results[("flower", 100, "13.6M")]:
        o, f = results[key], results[("flower", 100, "13.6M")]
        speed = f["seconds"] / o["seconds"]
        ok = speed >= TARGET_RATIO
        all_met &= ok
        cpu = f["cpu_s"] / o["cpu_s"]
        targets.append(f"- speed, N=100 P=13.6M, value checks included: ours {o['seconds'] / 100 * 1e3:.2f} ms per "
                       f"reply vs Flower {f['seconds'] / 100 * 1e3:.2f} ms: {speed:.2f}× faster in wall time, "
                       f"{cpu:.2f}× in CPU time (target ≥ {TARGET_RATIO:g}×) → {'met' if ok else 'MISSED'}")
    else:
        targets.append("- speed, N=100 P=13.6M: not measured in this run")
    ratios = [(n, label, results[("ours", n, label)]["seconds"] / results[("ours", n, label)]["bound_s"])
              for label in labels for n in ns if ("ours", n, label) in results]
    met = [r for r in ratios if r[2] <= 2]
    all_met &= len(met) == len(ratios)
    targets.append(
        "- bandwidth, ours within 2× of the read bound: "
        + ", ".join(f"N={n} P={label}: {r:.1f}× {'met' if r <= 2 else 'MISSED'}" for n, label, r in ratios))
    acc = [(n, label, results[("ours", n, label)]["checked_s"] / results[("ours", n, label)]["bound_s"])
           for label in labels for n in ns if ("ours", n, label) in results]
    targets.append("  (checks + accumulate alone / bound: "
                   + ", ".join(f"N={n} P={label}: {r:.1f}×" for n, label, r in acc) + ")")
    return "\n".join(rows), targets, all_met


def per_reply_table(results: dict, ns: list[int], labels: list[str]) -> str:
    """ms per reply: the headline (decode + accumulate_checked, timed in the round)
    next to Flower's, then the stages one by one after the round (stage_times):
    before = decode + check_values (one thread) + accumulate, as on_reply ran them."""
    head = ("| N | P | ours: decode + checked accumulate ms [cpu] | Flower aggregate_train ms [cpu] | Flower / ours "
            "| stages: decode | check_values (1 thread) [cpu] | checked_norm (threads) [cpu] | accumulate [cpu] "
            "| before: decode + check_values + accumulate |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for label in labels:
        for n in ns:
            o, f = (results.get((kind, n, label), {}) for kind in KINDS)
            if not o or "check_values_ms" not in o:
                continue
            ours, ours_cpu = o["seconds"] / n * 1e3, o["cpu_s"] / n * 1e3
            if f and "skipped" not in f:
                flower = f"{f['seconds'] / n * 1e3:.2f} [{f['cpu_s'] / n * 1e3:.2f}]"
                ratio = f"{f['seconds'] / o['seconds']:.2f}× [cpu {f['cpu_s'] / o['cpu_s']:.2f}×]"
            else:
                flower = ratio = "—"
            stage = {name: f"{o[name + '_ms']:.2f} [{o[name + '_cpu_ms']:.2f}]"
                     for name in ("check_values", "checked_norm", "accumulate")}
            before = o["decode_ms"] + o["check_values_ms"] + o["accumulate_ms"]
            rows.append(f"| {n} | {label} | {ours:.2f} [{ours_cpu:.2f}] | {flower} | {ratio} | {o['decode_ms']:.2f} "
                        f"| {stage['check_values']} | {stage['checked_norm']} | {stage['accumulate']} | {before:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N ∈ {10,100}, P = 1.8M, 1 repeat: a smoke run")
    parser.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 10,100,1000")
    parser.add_argument("--ps", type=lambda s: s.split(","), help=f"of {list(sup.MODELS)}")
    parser.add_argument("--repeats", type=int, help="subprocesses per case; median reported (default 3, quick 1)")
    parser.add_argument("--max-gb", type=float, default=12.0,
                        help="skip a case needing more memory than this (default 12)")
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS),
                        help=f"which sides to run, of {','.join(KINDS)} (default: all)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--kernel-ab", action="store_true",
                        help="only compare accumulate kernels (numpy vs torch), quiet and with every core busy")
    parser.add_argument("--case", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--p", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.n, args.p)), flush=True)
        return

    ns = args.ns or ([10, 100] if args.quick else [10, 100, 1000])
    labels = args.ps or (["1.8M"] if args.quick else ["1.8M", "13.6M"])
    if args.kernel_ab:
        report = kernel_ab(labels)
        print(report)
        if not args.no_write:
            _append(args.results, f"FedAvg accumulate kernels — {dt.datetime.now():%Y-%m-%d %H:%M}",
                    "python benchmarks/aggregation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                    report + "\n\nms per update (all tensors), median of 7 interleaved rounds of 8 updates; "
                    "all kernels give identical bits. \"other load\": the machine's 1-min load average "
                    "(other users' jobs included) after the row was measured.")
        return
    repeats = args.repeats or (1 if args.quick else 3)
    kinds = [k for k in KINDS if k in args.kinds]
    started, load0 = time.time(), os.getloadavg()
    code0 = _code_digest()
    runs: dict[tuple, list[dict]] = {}
    for rep in range(repeats):  # repeats outermost: noise from other jobs spreads over all cases
        for label in labels:
            p = sup.num_params(sup.layout(sup.MODELS[label]))
            for n in ns:
                for kind in kinds:
                    key = (kind, n, label)
                    if kind == "flower" and flower_need_bytes(n, p) > args.max_gb * 1e9:
                        runs[key] = [dict(skipped=f"needs {flower_need_bytes(n, p) / 1e9:.1f} GB "
                                                  f"(N·P·4 = {n * p * 4 / 1e9:.1f} GB of replies held) > --max-gb {args.max_gb:g}", p=p)]
                        continue
                    if runs.get(key) and "skipped" in runs[key][0]:
                        continue
                    t = time.time()
                    result = spawn(kind, n, label, timeout=1200)
                    runs.setdefault(key, []).append(result)
                    print(f"[{rep + 1}/{repeats}] {kind:8s} N={n:<5d} P={label:6s} "
                          + (f"skipped: {result['skipped']}" if "skipped" in result else
                             f"{result['seconds']:.3f} s, peak {mb(result['peak_bytes'])} MB over baseline")
                          + f"  ({time.time() - t:.0f} s wall)", file=sys.stderr, flush=True)
    results = {key: summarize(value) for key, value in runs.items()}
    text, targets, _ = table(results, ns, labels)
    load1 = os.getloadavg()
    loads = [r["load"] for rs in runs.values() for r in rs if "load" in r] or [load1[0]]
    command = "python benchmarks/aggregation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    first = next(r for r in results.values() if "skipped" not in r)
    impl = next((r["impl"] for (kind, _, _), r in results.items() if kind == "ours"), "?")
    notes = [
        f"- ours: strategies.fedavg.FedAvg, accumulate = {impl}",
        f"- {repeats} repeat(s) per case, each in its own subprocess, interleaved; median shown "
        "(bound: best). Synthetic replies: a pool of K distinct replies (K = N, or K·P·4 ≥ 256 MiB), "
        "reply i = entry i mod K, generated before the timed part (not timed, in the baseline).",
        f"- memory: {first.get('probe')}, baseline after set-up and malloc_trim; "
        "ours = peak over the RSS with the global adapter and the reply pool in memory; "
        "Flower = N replies held (built after the baseline) + the extra peak during aggregate_train. "
        "Both sides first run a warm-up on the same layout (ours: one 2-reply round; Flower: one "
        "2-reply aggregate_train), so one-time costs are not counted.",
        "- ours s = begin_round + N × (codec.decode + accumulate_checked) + finish_round: the value checks "
        f"(finite, norm under a bound of {NORM_BOUND:g}) are included; check_header is not. "
        "Flower s = aggregate_train only. "
        "Wall-clock seconds; [cpu …] is the process CPU time of the same part (all threads), less "
        "sensitive to other jobs taking the cores. Flower runs on one thread; ours shares the norm's "
        "slices and the large tensors' accumulate among the kernels' threads (strategies/checked_sum.py, "
        "strategies/kernels.py).",
        "- bound: time to read N·P·4 bytes once (np.sum and torch.sum over a 512 MiB buffer, the fastest of 3 each), "
        "measured in ours's subprocess right after its timed part.",
        f"- load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
        f"at end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} (other jobs share the machine); "
        f"wall time {time.time() - started:.0f} s; 1-min load seen by the cases: "
        f"{min(loads):.1f} to {max(loads):.1f} (median {statistics.median(loads):.1f}).",
    ]
    code1 = _code_digest()
    if code1 != code0:
        notes.append(f"- WARNING: code under test changed during the run ({code0} → {code1}): "
                     "rows may mix versions; run again.")
    else:
        notes.append(f"- code under test (sha256 of protos/codec.py, protos/encodings/*.py, strategies/base.py, "
                     f"strategies/fedavg.py, strategies/kernels.py, strategies/sum_kernels.py, strategies/checked_sum.py, "
                     f"protos/norm_kernels.py): {code0}")
    report = "\n".join([text, "", "Targets:", *targets, "",
                        "Per reply (medians of the repeats; ours and Flower: timed part / N; stages: median over "
                        "up to 32 replies of each case, run one by one after the timed part, reference = the "
                        "global adapter):", "",
                        per_reply_table(results, ns, labels), "", *notes])
    print(report)
    if not args.no_write:
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        _append(args.results, f"FedAvg aggregation vs Flower — {stamp}{' (quick)' if args.quick else ''}",
                command, report)


def _code_digest() -> str:
    import hashlib

    digest = hashlib.sha256()
    # decode dispatches to the encoding modules (fp32's is the one timed here): they are code under test too
    encodings = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos" / "encodings").glob("*.py"))
    for name in ("protos/codec.py", *encodings, "strategies/base.py", "strategies/fedavg.py", "strategies/kernels.py",
                 "strategies/sum_kernels.py", "strategies/checked_sum.py", "protos/norm_kernels.py"):
        path = ROOT / name
        digest.update(path.read_bytes() if path.exists() else b"-")
    return digest.hexdigest()[:12]


def _append(path: Path, title: str, command: str, body: str) -> None:
    import numpy
    import flwr

    section = (f"\n## {title}\n\nMachine: {sup.machine()}. Python {sys.version.split()[0]}, "
               f"numpy {numpy.__version__}, flwr {flwr.__version__}.\n\n"
               f"Command: `{command.strip()}`\n\n{body}\n")
    if not path.exists():
        path.write_text("# Benchmark results\n")
    with path.open("a") as out:
        out.write(section)
    print(f"\nappended to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
