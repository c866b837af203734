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
    strategy.begin_round(1, {k: np.zeros(s, np.float32) for k, s in shapes.items()})   # warm-up: one-time
    for reply in pool[:2]:                                                            # costs not counted
        header, update = codec.decode(reply)
        strategy.accumulate(update, int(header.num_examples))
    strategy.finish_round()
    started = time.perf_counter()
    strategy.begin_round(1, {k: np.zeros(s, np.float32) for k, s in shapes.items()})
    for i in range(n):
        header, update = codec.decode(pool[i % len(pool)])
        strategy.accumulate(update, int(header.num_examples))
        del update
    strategy.finish_round()
    return {"coordinator_total_s": time.perf_counter() - started, "pool": len(pool)}


def case_ours(n: int, shapes, dropped: int) -> dict:
    from protos.secagg import MaskingClient, RingSpec, Session, wire
    from protos.secagg.layout import flatten, layout_of
    from server.secure_aggregation import SecAggCoordinator

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
        reply = wire.mask_reply(session.session_id, i, vector)   # what travels: a uint32 Array
        del vector
        masked_bytes = len(reply.array_records[wire.MASKED_RECORD]["masked"].data)
        up[i] += masked_bytes
        if i in gone:
            continue
        exact += x * float(weight_of(i)); weight_sum += weight_of(i)
        del x
        t = time.perf_counter()
        coordinator.add_masked(*wire.parse_mask_reply(reply, session.session_id))
        coord["sum_s"] += time.perf_counter() - t
        del reply
    t = time.perf_counter(); survivors, dropped_ids = coordinator.unmask_request(); coord["routing_s"] += time.perf_counter() - t
    unmask_s = []
    for i in survivors:
        t = time.perf_counter()
        answer = clients[i].unmask(survivors, dropped_ids, coordinator.asks_corrections)
        unmask_s.append(time.perf_counter() - t)
        reply = wire.unmask_reply(session.session_id, i, answer)
        del answer
        up[i] += sum(len(v) for v in reply.config_records[wire.SECAGG_RECORD].values() if isinstance(v, bytes)) + \
            sum(len(b) for v in reply.config_records[wire.SECAGG_RECORD].values() if isinstance(v, list)
                for b in v if isinstance(b, bytes))
        if wire.CORRECTION_RECORD in reply.array_records:
            up[i] += len(reply.array_records[wire.CORRECTION_RECORD]["correction"].data)
        t = time.perf_counter()
        coordinator.add_unmask(*wire.parse_unmask_reply(reply, session.session_id))
        coord["unmask_s"] += time.perf_counter() - t
        del reply
    t = time.perf_counter(); result = coordinator.finish(); coord["unmask_s"] += time.perf_counter() - t
    exact /= weight_sum
    error = float(np.abs(result.mean - exact).max())
    return {
        "client_keys_s": float(np.median(list(keys_s.values()))),
        "client_mask_s": float(np.median(mask_s)),
        "client_unmask_s": float(np.median(unmask_s)),
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
        "client_unmask_s": out["client_unmask_s"],
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
    head = ("| N | P | dropped | kind | client keys s | client mask s | client unmask s | coord. sum s | "
            "coord. unmask s | coord. total s | × plain | MB up / client | masked × fp32 | max error | peak RSS MB |")
    out = [head, "|" + "---|" * 15]
    for r in rows:
        if "skipped" in r:
            n, p, d = r["case"].split(":")
            out.append(f"| {n} | {p} | {d} | {r['kind']} | skipped: {r['skipped']} |" + " |" * 10)
            continue
        base = plain.get(r["case"].rsplit(":", 1)[0] + ":" + str(r["dropped"]))
        ratio = f"{r['coordinator_total_s'] / base['coordinator_total_s']:.2f}" if base else "–"
        fmt = lambda key, f="{:.3f}": f.format(r[key]) if r.get(key) is not None else "–"  # noqa: E731
        masked = f"{r['masked_bytes'] / r['fp32_bytes']:.3f}" if r.get("masked_bytes") else "–"
        mb_up = f"{r['bytes_up'] / 1e6:.2f}" if r.get("bytes_up") else "–"
        out.append(
            f"| {r['n']} | {r['p'] / 1e6:.2f}M | {r['dropped']} | {r['kind']}{' ‡' if r.get('reused') else ''} | "
            f"{fmt('client_keys_s')} | "
            f"{fmt('client_mask_s')} | {fmt('client_unmask_s')} | {fmt('coordinator_sum_s')} | "
            f"{fmt('coordinator_unmask_s')} | "
            f"{fmt('coordinator_total_s')} | {ratio} | "
            f"{mb_up} | {masked} | "
            f"{fmt('max_error', '{:.2e}')} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(out)


def _key(row: dict) -> tuple[int, int, int] | None:
    return (row["n"], row["p"], row["dropped"]) if "skipped" not in row else None


def flower_estimate(rows: list[dict], n: int, p: int) -> dict[str, float] | None:
    """Flower's times at (n, p), no dropout, fitted linearly in P through its two
    measured cases of the same N with the largest P (None without two)."""
    measured = sorted((r for r in rows if r["kind"] == "flower" and _key(r) and r["n"] == n and r["dropped"] == 0),
                      key=lambda r: r["p"])[-2:]
    if len(measured) < 2 or measured[0]["p"] == measured[1]["p"]:
        return None
    (a, b) = measured
    fit = lambda key: a[key] + (b[key] - a[key]) * (p - a["p"]) / (b["p"] - a["p"])  # noqa: E731
    return {key: fit(key) for key in ("client_keys_s", "client_mask_s", "coordinator_sum_s", "coordinator_unmask_s",
                                      "coordinator_total_s")} | {"from": f"P={a['p']:,} and P={b['p']:,}"}


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets at N=100, P=13.6M: coordinator total ≤ 1.5× plain, masked payload ≤ 1.25× fp32."""
    by = {(r["kind"], _key(r)): r for r in rows if _key(r)}
    lines = []
    for (kind, key), row in sorted(by.items(), key=lambda item: (item[0][1], item[0][0])):
        if kind != "ours" or key[0] != 100 or key[1] < 10_000_000:
            continue
        plain = by.get(("plain", key))
        if plain:
            ratio = row["coordinator_total_s"] / plain["coordinator_total_s"]
            with_client = (row["coordinator_total_s"] + row["client_keys_s"] + row["client_mask_s"]) / \
                plain["coordinator_total_s"]
            lines.append(f"- N=100, P={key[1] / 1e6:.1f}M, {key[2]} dropped after masking: coordinator total "
                         f"{row['coordinator_total_s']:.2f} s = {ratio:.2f}× plain ({plain['coordinator_total_s']:.2f} s), "
                         f"target ≤ 1.5× → {'met' if ratio <= 1.5 else 'MISSED'}; with one organization's keys + "
                         f"masking added (the round's critical path): {with_client:.2f}×")
        share = row["masked_bytes"] / row["fp32_bytes"]
        lines.append(f"- N=100, P={key[1] / 1e6:.1f}M, {key[2]} dropped: masked payload {row['masked_bytes']:,} B = "
                     f"{share:.3f}× the fp32 update ({row['fp32_bytes']:,} B), target ≤ 1.25× → "
                     f"{'met' if share <= 1.25 else 'MISSED'}; whole upload per organization "
                     f"{row['bytes_up'] / row['fp32_bytes']:.3f}×")
    flower = flower_estimate(rows, 100, 13_631_488)
    if flower:
        lines.append(f"- Flower SecAgg+ at N=100, P=13.6M (not run: its replies alone need ~11 GB of int64), "
                     f"*estimated* linearly in P from its N=100 cases at {flower['from']}: client masking "
                     f"{flower['client_mask_s']:.1f} s, coordinator sum {flower['coordinator_sum_s']:.1f} s, "
                     f"unmask {flower['coordinator_unmask_s']:.0f} s, total {flower['coordinator_total_s']:.0f} s")
    return lines


def section(rows: list[dict], command: str, load_start: tuple, load_end: tuple, wall: float) -> str:
    import datetime as dt
    import platform

    import cryptography
    import flwr

    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"## Secure aggregation vs Flower SecAgg+ — {stamp}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs "
        f"(load average 1/5/15 min at start {'/'.join(f'{x:.1f}' for x in load_start)}, at end "
        f"{'/'.join(f'{x:.1f}' for x in load_end)}). Python {platform.python_version()}, numpy {np.__version__}, "
        f"flwr {flwr.__version__ if hasattr(flwr, '__version__') else '1.41'}, cryptography {cryptography.__version__}.",
        "",
        f"Command: `{command}` ({wall:.0f} s)",
        "",
        table(rows),
        "",
        "Targets:",
        *targets(rows),
        "",
        "- ours: protos/secagg (X25519 + HKDF-SHA256 pairwise masks, AES-128-CTR PRG, 32-bit ring sized for N, "
        "Shamir over GF(2^521−1) of the mask key and self-mask seed, threshold t = ⌊N/2⌋+1) + "
        "server/secure_aggregation/coordinator.py; every organization really masks, the coordinator really unmasks; "
        "clip 0.05, max weight 1000.",
        "- Flower: SecAggPlusWorkflow(num_shares=N, reconstruction_threshold=t, clipping_range=0.05, "
        "max_weight=max nᵢ) run unchanged against an in-process Grid feeding its own secaggplus_mod "
        "(benchmarks/secagg_flower.py); its coordinator time includes its legacy FedAvg.aggregate_fit over N copies "
        "of the unmasked result, which the workflow calls.",
        "- plain: our streaming FedAvg (codec.decode + accumulate per fp32 reply, finish_round) over the inputs "
        "that arrive. × plain = coordinator total / plain total of the same N, P and dropouts.",
        "- client times: the median over the N organizations (each runs its stages in turn in one process here; "
        "in a deployment they run in parallel at the organizations). Masking = decrypt shares + quantize + N masks.",
        "- dropped: organizations that masked but whose masked input never arrived. Each survivor then sends, "
        "with its unmask shares, the sum of its d masks shared with the dropped (client unmask s; P·4 bytes more "
        "up, in MB up / client); the coordinator subtracts those and expands only the N−d self-masks (plus, for a "
        "survivor that sends no correction, its d pairwise masks from the reconstructed keys). Flower's "
        "coordinator expands all d·(N−d) itself.",
        "- max error: |secure mean − exact float64 weighted mean| over all values (the ring's bound ~4e-9 here).",
        "- ‡: taken from an earlier run (--reuse), not re-run with the others: Flower's N=100 cases take "
        "tens of minutes here.",
        "- wall-clock times on shared cores: cases run minutes apart under different load; compare within a row "
        "group, and expect ±50% between runs.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs=2, metavar=("KIND", "N:P:D"), help=argparse.SUPPRESS)
    parser.add_argument("--cases", nargs="+", default=None)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per case, seconds")
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip Flower cases estimated above this")
    parser.add_argument("--json", type=Path, help="append each case's result here (JSON lines)")
    parser.add_argument("--reuse", type=Path, help="JSON lines of earlier cases: a (kind, case) found there is "
                                                   "not run again (Flower's N=100 cases take tens of minutes)")
    parser.add_argument("--results", type=Path, help="append a markdown section (table, targets) to this file")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case)), flush=True)
        return
    cases = args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES)
    reused = {}
    if args.reuse:
        for line in args.reuse.read_text().splitlines():
            row = json.loads(line)
            reused[(row["kind"], row["case"])] = row
    load_start, started = os.getloadavg(), time.perf_counter()
    rows = []
    for spec in cases:
        for kind in args.kinds:
            if (kind, spec) in reused:
                row = {**reused[(kind, spec)], "reused": True}
            elif kind == "flower" and flower_memory_gb(spec) > args.max_gb:
                row = {"kind": kind, "case": spec,
                       "skipped": f"needs ~{flower_memory_gb(spec):.0f} GB (--max-gb {args.max_gb:g})"}
            else:
                row = launch(kind, spec, args.timeout)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ring"}), file=sys.stderr, flush=True)
            if args.json and not row.get("reused"):
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows))
    print("\n".join(targets(rows)))
    if args.results:
        command = "python benchmarks/secagg.py " + " ".join(sys.argv[1:])
        with args.results.open("a") as f:
            f.write("\n" + section(rows, command, load_start, os.getloadavg(), time.perf_counter() - started))


if __name__ == "__main__":
    main()
