#!/usr/bin/env python
"""Bytes and quality of the demo under each update / global encoding, against fp32 both ways.

    python benchmarks/update_encodings.py                          # fp32/fp32, q4/q4, q4/int8 (~3 demo runs)
    python benchmarks/update_encodings.py --combos q4:q4,fp16:fp16 # fp32/fp32 is always run too: the baseline
    python benchmarks/update_encodings.py --work-dir /tmp/enc --reuse   # tabulate runs already in WORK_DIR
    python benchmarks/update_encodings.py --combos q4:q8+delta --baseline-dir /tmp/enc/up-fp32-down-fp32 \
        --set round-timeout=3000                                     # global-delta; fp32 read, not rerun

Each combination is one ``silotune simulate --scenario demo --set update-encoding=UP
--set global-encoding=DOWN`` run (a subprocess, run dir WORK_DIR/up-UP-down-DOWN); DOWN+delta
adds ``--set global-delta=true`` (run dir ...-down-DOWN-delta), ``--set KEY=VALUE`` goes to every
run, and ``--baseline-dir`` reads the fp32 row from a finished run instead of running it. The
table is read from each report.json:

* bytes per organization-round, up and down: a trained round's ``bytes`` (server/traffic.py)
  over the organizations it sampled. Down is two pushes of the global (train, then
  evaluate) with their round config; up is the update and the evaluation reply.
* bytes of the job: ``bytes_moved`` (round 0's base evaluation included), and fp32's over it;
* final overall accuracy and perplexity on the held-out splits, and the accuracy's
  change relative to fp32's (the issue's bar: within 1%).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ("fp32", "fp32")


DELTA = "+delta"   # DOWN+delta: the job setting global-delta (server/downlink.py)


def run_dir(work_dir: Path, up: str, down: str) -> Path:
    return work_dir / f"up-{up}-down-{down.replace(DELTA, '-delta')}"


def run_demo(work_dir: Path, up: str, down: str, extra: list[str]) -> float:
    """One demo run under these encodings (and ``--set`` pairs ``extra``); its wall time in seconds."""
    out = run_dir(work_dir, up, down)
    encoding = down.removesuffix(DELTA)
    cmd = [sys.executable, "-m", "simulations.cli.main", "simulate", "--scenario", "demo", "--run-dir", str(out),
           "--set", f"update-encoding={up}", "--set", f"global-encoding={encoding}"]
    if down.endswith(DELTA):
        cmd += ["--set", "global-delta=true"]
    for pair in extra:
        cmd += ["--set", pair]
    started = time.monotonic()
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.monotonic() - started


def figures(report: dict) -> dict:
    trained = [h for h in report["history"] if h["round"] > 0]
    last = trained[-1]
    sampled = last["sampled"]
    final = report["overall"]["specialist"]
    return {"up": last["bytes"]["up"] / sampled, "down": last["bytes"]["down"] / sampled,
            "total": report["bytes_moved"]["total"], "accuracy": final["accuracy"],
            "perplexity": final["perplexity"]}


def table(rows: list[tuple[str, str, dict]]) -> str:
    base = next(f for up, down, f in rows if (up, down) == BASELINE)
    lines = ["| update (up) | global (down) | bytes up / org-round | bytes down / org-round | bytes of the job "
             "| fewer bytes than fp32 | final accuracy | vs fp32 (relative) | final perplexity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for up, down, f in rows:
        change = (f["accuracy"] - base["accuracy"]) / base["accuracy"]
        lines.append(f"| {up} | {down} | {f['up']:,.0f} | {f['down']:,.0f} | {f['total']:,} "
                     f"| {base['total'] / f['total']:.2f}x | {f['accuracy']:.4f} | {change:+.2%} "
                     f"| {f['perplexity']:.4f} |".replace(",", " "))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--combos", default="q4:q4,q4:int8",
                        help="UP:DOWN pairs, comma-separated; DOWN+delta (q4:q8+delta) sets global-delta")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config setting for every run (e.g. round-timeout=3000); repeatable")
    parser.add_argument("--baseline-dir", type=Path,
                        help="a finished fp32/fp32 demo run whose report.json is the baseline row (not rerun)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/silotune-encodings"))
    parser.add_argument("--reuse", action="store_true", help="read the runs already in --work-dir; run none")
    args = parser.parse_args()
    combos = [BASELINE] + [tuple(pair.split(":")) for pair in args.combos.split(",") if pair]
    combos = list(dict.fromkeys(combos))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for up, down in combos:
        from_dir = args.baseline_dir if (up, down) == BASELINE and args.baseline_dir else None
        if not args.reuse and from_dir is None:
            seconds = run_demo(args.work_dir, up, down, args.extra)
            print(f"demo with update-encoding={up}, global-encoding={down}: {seconds:.0f} s", flush=True)
        report = json.loads(((from_dir or run_dir(args.work_dir, up, down)) / "report.json").read_text())
        rows.append((up, down, figures(report)))
    print(table(rows))


if __name__ == "__main__":
    main()
