#!/usr/bin/env python
"""Secure aggregation: silotune's protocol vs Flower 1.41's SecAgg+ (legacy workflow),
and vs silotune's plain (unmasked) streaming FedAvg.

    python benchmarks/secagg.py --quick                 # N=10, P=100k; no dropout and N−t dropouts (~1 min)
    python benchmarks/secagg.py --cases 10:1.8M:0 100:13.6M:0 --kinds plain ours
    python benchmarks/secagg.py                          # the default grid (tens of minutes on 2 busy cores)

A case is N:P:D — N organizations, P update values ("1.8M", "13.6M" are the
LoRA r=32 q/v adapters of SmolLM2-135M and Mistral-7B; a plain integer is a
flat vector), D of them dropping after masking (their masked input never
arrives; "t" means N − t, the most the threshold t = ⌊N/2⌋+1 allows). Every
case runs in its own subprocess; peak RSS is that process's (ru_maxrss).

What is timed, per kind:

* **plain** — the coordinator's plain round: for each of N fp32 replies
  (Flower RecordDicts from ``codec.encode``, a pool of distinct ones reused)
  ``codec.decode`` + ``FedAvg.accumulate``, then ``finish_round``.
* **ours** — every organization really runs ``MaskingClient`` (keys, shares,
  mask) and the coordinator really runs ``SecAggCoordinator``; the masked
  vector travels as a Flower Array (uint32). *client keys*: advertise +
  share_keys; *client mask*: decrypt shares + quantize + N masks (median over
  organizations); *coordinator sum*: Array → ndarray + ``add_masked`` for
  every arriving input; *coordinator unmask*: ``finish`` (Shamir
  reconstruction, self-masks of survivors and pairwise masks of the dropped,
  dequantization). Memory O(P): inputs are summed as they arrive.
* **flower** — ``SecAggPlusWorkflow`` (num_shares = N: the same full graph,
  same threshold, clipping_range = our clip) driving Flower's own
  ``secaggplus_mod`` per node in process (benchmarks/secagg_flower.py).
  *client mask*: the mod's masked-vector stage; *coordinator sum*: the
  workflow's collect stage minus its clients' time; *coordinator unmask*: the
  unmask stage minus its clients' time. Flower holds every masked reply.

Bytes per client: what one organization uploads over the whole protocol
(keys, sealed shares, the masked vector, unmask shares); "× fp32" is the
masked vector alone over the fp32 update's Array bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402

CLIP = 0.05          # per-coordinate bound on an update value (updates here are N(0, 0.01))
MAX_WEIGHT = 1000    # example counts are drawn in 1..MAX_WEIGHT
SEED = 20240
DEFAULT_CASES = ["10:1.8M:0", "10:1.8M:t", "100:1.8M:0", "100:1.8M:10", "100:13.6M:0"]
QUICK_CASES = ["10:100000:0", "10:100000:t"]
KINDS = ("plain", "ours", "flower")


# ---- the update layout -------------------------------------------------------
def layout(label: str) -> dict[str, tuple[int, ...]]:
    """PEFT names and shapes of a LoRA r=32 adapter on q_proj+v_proj, or one flat tensor."""
    models = {"1.8M": (576, 192, 30), "13.6M": (4096, 1024, 32)}  # hidden, v out, layers
    if label not in models:
        return {"update": (int(float(label)),)}
    hidden, kv_out, layers = models[label]
    shapes = {}
    for i in range(layers):
        for module, out in (("q_proj", hidden), ("v_proj", kv_out)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (32, hidden)
            shapes[f"{prefix}.lora_B.weight"] = (out, 32)
    return dict(sorted(shapes.items()))


def update_of(shapes, i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([SEED, i])
    return {k: np.clip(rng.standard_normal(s, dtype=np.float32) * np.float32(0.01), -CLIP, CLIP)
            for k, s in shapes.items()}


def weight_of(i: int) -> int:
    return int(np.random.default_rng([SEED, i, 1]).integers(1, MAX_WEIGHT + 1))


def fp32_bytes(shapes) -> int:
    from flwr.app import Array
    return sum(len(Array(np.zeros(s, np.float32)).data) for s in shapes.values())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the cases (each in its own process) -------------------------------------
def case_plain(n: int, shapes) -> dict:
    from protos import codec
    from protos.adapter import LoraSpec
    from strategies.fedavg import FedAvg

    p = sum(math.prod(s) for s in shapes.values())
    distinct = min(n, max(4, math.ceil(2**28 / (4 * p))))   # ≥ 256 MiB of distinct replies: no cache reuse
    pool = [codec.encode(update_of(shapes, i), kind=codec.Kind.Value("UPDATE"), job_id="bench", server_round=1,
                         fingerprint="bench", lora=LoraSpec(rank=32, alpha=64.0), num_examples=weight_of(i))
            for i in range(distinct)]
    strategy = FedAvg()
    started = time.perf_counter()
    strategy.begin_round(1, {k: np.zeros(s, np.float32) for k, s in shapes.items()})
    for i in range(n):
        header, update = codec.decode(pool[i % len(pool)])
        strategy.accumulate(update, int(header.num_examples))
        del update
    strategy.finish_round()
    return {"coordinator_total_s": time.perf_counter() - started, "pool": len(pool)}


def case_ours(n: int, shapes, dropped: int) -> dict:
    from flwr.app import Array, ArrayRecord

    from protos.secagg import MaskingClient, RingSpec, Session
    from protos.secagg.layout import flatten, layout_of
    from server.secagg import SecAggCoordinator

    lay = layout_of(shapes)
    p = sum(math.prod(s) for s in shapes.values())
    participants = tuple(range(1, n + 1))
    session = Session(os.urandom(16), participants, Session.default_threshold(n),
                      RingSpec.derive(n, CLIP, MAX_WEIGHT), p)
    gone = set(int(i) for i in np.random.default_rng(SEED).choice(participants, dropped, replace=False))
    clients = {i: MaskingClient(session, i) for i in participants}
    coordinator = SecAggCoordinator(session)
    keys_s = {i: 0.0 for i in participants}
    up = {i: 0 for i in participants}
    coord = {"routing_s": 0.0, "sum_s": 0.0, "unmask_s": 0.0}

    for i, c in clients.items():
        t = time.perf_counter(); pk = c.advertise(); keys_s[i] += time.perf_counter() - t
        up[i] += len(pk.mask) + len(pk.encryption)
        coordinator.add_keys(i, pk)
    t = time.perf_counter(); roster = coordinator.roster(); coord["routing_s"] += time.perf_counter() - t
    for i, c in clients.items():
        t = time.perf_counter(); shares = c.share_keys(roster); keys_s[i] += time.perf_counter() - t
        up[i] += sum(len(s) + 4 for s in shares.sealed.values()) + len(shares.seed_commitment)
        t = time.perf_counter(); coordinator.add_shares(i, shares); coord["routing_s"] += time.perf_counter() - t
    t = time.perf_counter(); routes = coordinator.routing(); coord["routing_s"] += time.perf_counter() - t

    mask_s, masked_bytes = [], 0
    exact = np.zeros(p, np.float64)   # the plain weighted sum of the survivors, to check the result
    weight_sum = 0
    for i in participants:
        x = flatten(update_of(shapes, i), lay)
        t = time.perf_counter(); vector = clients[i].mask(routes[i], x, weight_of(i)); mask_s.append(time.perf_counter() - t)
        record = ArrayRecord({"masked": Array(vector)})   # what travels: a uint32 Array
        del vector
        masked_bytes = len(record["masked"].data)
        up[i] += masked_bytes
        if i in gone:
            continue
        exact += x * float(weight_of(i)); weight_sum += weight_of(i)
        del x
        t = time.perf_counter()
        coordinator.add_masked(i, record["masked"].numpy())
        coord["sum_s"] += time.perf_counter() - t
        del record
    t = time.perf_counter(); survivors, dropped_ids = coordinator.unmask_request(); coord["routing_s"] += time.perf_counter() - t
    for i in survivors:
        answer = clients[i].unmask(survivors, dropped_ids)
        up[i] += 70 * (len(answer.seed) + len(answer.mask_key))
        coordinator.add_unmask(i, answer)
    t = time.perf_counter(); result = coordinator.finish(); coord["unmask_s"] = time.perf_counter() - t
    exact /= weight_sum
    error = float(np.abs(result.mean - exact).max())
    return {
        "client_keys_s": float(np.median(list(keys_s.values()))),
        "client_mask_s": float(np.median(mask_s)),
        "coordinator_sum_s": coord["sum_s"],
        "coordinator_unmask_s": coord["unmask_s"],
        "coordinator_total_s": sum(coord.values()),
        "finish_detail": result.timings,
        "bytes_up": int(np.median([up[i] for i in survivors])),
        "masked_bytes": masked_bytes,
        "fp32_bytes": fp32_bytes(shapes),
        "max_error": error,
        "error_bound": result.error_bound + float(np.abs(exact).max()) * 2.0**-24,
        "ring": session.ring.to_dict(),
        "threshold": session.threshold,
    }


def case_flower(n: int, shapes, dropped: int) -> dict:
    from secagg_flower import run_flower_secaggplus

    nodes = list(range(1001, 1001 + n))
    updates = {nid: list(update_of(shapes, i).values()) for i, nid in enumerate(nodes, start=1)}
    weights = {nid: weight_of(i) for i, nid in enumerate(nodes, start=1)}
    gone_idx = set(int(i) for i in np.random.default_rng(SEED).choice(range(1, n + 1), dropped, replace=False))
    gone = [nodes[i - 1] for i in gone_idx]
    threshold = max(2, n // 2 + 1)
    out = run_flower_secaggplus(updates, weights, threshold, CLIP, gone)
    survivors = [nid for nid in nodes if nid not in gone]
    total_w = sum(weights[nid] for nid in survivors)
    error = 0.0
    for j, got in enumerate(out["result"]):
        exact = sum(updates[nid][j].astype(np.float64) * weights[nid] for nid in survivors) / total_w
        error = max(error, float(np.abs(got - exact).max()))
    coordinator = out["coordinator_s"]
    return {
        "client_keys_s": out["client_keys_s"],
        "client_mask_s": out["client_mask_s"],
        "coordinator_sum_s": coordinator["collect_masked_vectors"],
        "coordinator_unmask_s": coordinator["unmask"],
        "coordinator_total_s": sum(coordinator.values()),
        "bytes_up": out["bytes_up"],
        "masked_bytes": out["masked_bytes"],
        "fp32_bytes": fp32_bytes(shapes),
        "max_error": error,
        "threshold": threshold,
    }


def run_case(kind: str, spec: str) -> dict:
    n_text, p_label, d_text = spec.split(":")
    n = int(n_text)
    dropped = n - max(2, n // 2 + 1) if d_text == "t" else int(d_text)
    shapes = layout(p_label)
    started = time.perf_counter()
    if kind == "plain":
        out = case_plain(n - dropped, shapes)   # plain aggregation of the inputs that arrive
    elif kind == "ours":
        out = case_ours(n, shapes, dropped)
    else:
        out = case_flower(n, shapes, dropped)
    p = sum(math.prod(s) for s in shapes.values())
    return {"kind": kind, "case": spec, "n": n, "p": p, "dropped": dropped, **out,
            "wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


# ---- the driver --------------------------------------------------------------
def flower_memory_gb(spec: str) -> float:
    n, p_label, _ = spec.split(":")
    p = sum(math.prod(s) for s in layout(p_label).values())
    return int(n) * p * (4 + 8 + 8) / 2**30   # updates + masked replies (int64) + their serialized bytes


def launch(kind: str, spec: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--case", kind, spec]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"kind": kind, "case": spec, "skipped": f"over {timeout:.0f}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"kind": kind, "case": spec, "skipped": f"failed: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    plain = {r["case"].rsplit(":", 1)[0] + ":" + str(r["dropped"]): r for r in rows
             if r["kind"] == "plain" and "skipped" not in r}
    head = ("| N | P | dropped | kind | client keys s | client mask s | coord. sum s | coord. unmask s | "
            "coord. total s | × plain | MB up / client | masked × fp32 | max error | peak RSS MB |")
    out = [head, "|" + "---|" * 14]
    for r in rows:
        if "skipped" in r:
            n, p, d = r["case"].split(":")
            out.append(f"| {n} | {p} | {d} | {r['kind']} | skipped: {r['skipped']} |" + " |" * 9)
            continue
        base = plain.get(r["case"].rsplit(":", 1)[0] + ":" + str(r["dropped"]))
        ratio = f"{r['coordinator_total_s'] / base['coordinator_total_s']:.2f}" if base else "–"
        fmt = lambda key, f="{:.3f}": f.format(r[key]) if r.get(key) is not None else "–"  # noqa: E731
        masked = f"{r['masked_bytes'] / r['fp32_bytes']:.3f}" if r.get("masked_bytes") else "–"
        mb_up = f"{r['bytes_up'] / 1e6:.2f}" if r.get("bytes_up") else "–"
        out.append(
            f"| {r['n']} | {r['p'] / 1e6:.2f}M | {r['dropped']} | {r['kind']} | {fmt('client_keys_s')} | "
            f"{fmt('client_mask_s')} | {fmt('coordinator_sum_s')} | {fmt('coordinator_unmask_s')} | "
            f"{fmt('coordinator_total_s')} | {ratio} | "
            f"{mb_up} | {masked} | "
            f"{fmt('max_error', '{:.2e}')} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs=2, metavar=("KIND", "N:P:D"), help=argparse.SUPPRESS)
    parser.add_argument("--cases", nargs="+", default=None)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per case, seconds")
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip Flower cases estimated above this")
    parser.add_argument("--json", type=Path, help="append each case's result here (JSON lines)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case)), flush=True)
        return
    cases = args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES)
    rows = []
    for spec in cases:
        for kind in args.kinds:
            if kind == "flower" and flower_memory_gb(spec) > args.max_gb:
                row = {"kind": kind, "case": spec,
                       "skipped": f"needs ~{flower_memory_gb(spec):.0f} GB (--max-gb {args.max_gb:g})"}
            else:
                row = launch(kind, spec, args.timeout)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ring"}), file=sys.stderr, flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
