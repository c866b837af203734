"""Naive FedAvg vs exact LoRA aggregation vs FFA-LoRA vs FedAdam vs heterogeneous ranks.

On the demo data (BBC News topics, label skew 0.8, SmolLM2-135M-Instruct),
with 3 and with 10 organizations; held-out accuracy per round, overall
(example-weighted over organizations). Writes docs/strategies.md (table) and
docs/strategies.png (curves).

    python -m simulations.experiments.compare_strategies            # full: 3 and 10 organizations
    python -m simulations.experiments.compare_strategies --orgs 3   # one fleet size

Sized for a 2-core CPU (about 45 minutes for both fleet sizes): fewer local
steps and evaluation examples than `make demo`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from simulations.experiments.arms import run_once
from simulations.scenario import Scenario

ARMS: dict[str, dict[str, Any]] = {
    "FedAvg (naive A/B mean)": {"strategy": "fedavg"},
    "exact LoRA aggregation": {"strategy": "exact-lora"},
    "FFA-LoRA (B only)": {"strategy": "ffa-lora"},
    "FedAdam (eta=0.005)": {"strategy": "fedadam", "strategy-params": "eta=0.005"},
    "HetLoRA ranks 4/8/16": {"strategy": "hetlora", "lora-r": 16, "lora-alpha": 32.0, "sim-ranks": "4,8,16"},
}

BASE = {
    "model": "smollm2-135m",
    "num-rounds": 2,
    "lora-r": 8,
    "lora-alpha": 16.0,
    "local-steps": 6,
    "batch-size": 4,
    "learning-rate": 0.001,
    "max-length": 160,
    "eval-max-examples": 20,
    "sim-dataset": "bbc-news",
    "sim-skew": 0.8,
    "sim-max-records": 100,
    # Generous: on a shared 2-core CPU 10 SmolLM2 organizations queue for 2 Ray actors, and the
    # HetLoRA arm once stopped on its quorum check when 2 of 10 missed a 600 s deadline.
    "round-timeout": 1800,
}


def arm_dir(name: str, orgs: int, out: Path) -> Path:
    slug = name.split(" (")[0].lower().replace(" ", "-").replace("/", "")
    return out / "runs" / f"{orgs}-orgs" / slug


def run_arm(name: str, orgs: int, out: Path, report_only: bool = False) -> dict[str, Any] | None:
    run_dir = arm_dir(name, orgs, out)
    slug = run_dir.name
    settings = {**BASE, **ARMS[name], "min-nodes": orgs, "job-id": f"compare-{slug}-{orgs}",
                "run-dir": str(run_dir)}
    scenario = Scenario(name=f"compare-{orgs}", num_organizations=orgs, run_config=settings)
    done = run_once(scenario, report_only=report_only)
    if done is None:
        return None
    report, wall = done
    return {
        "arm": name,
        "orgs": orgs,
        "accuracy": [h["eval_overall"].get("accuracy", math.nan) for h in report["history"]],
        "min_org_gain": min(o["specialist"]["accuracy"] - o["base"]["accuracy"]
                            for o in report["organizations"].values()),
        "wall_s": wall,
    }


def write_outputs(results: list[dict[str, Any]], out: Path, command: str, missing: list[str]) -> None:
    rounds = max(len(r["accuracy"]) for r in results)
    header = "| organizations | strategy | " + " | ".join(
        "base (round 0)" if i == 0 else f"round {i}" for i in range(rounds)) + " | worst org gain | wall |"
    lines = [header, "|" + "---|" * (rounds + 4)]
    for r in results:
        cells = " | ".join(f"{a:.3f}" for a in r["accuracy"])
        lines.append(f"| {r['orgs']} | {r['arm']} | {cells} | {r['min_org_gain']:+.3f} | {r['wall_s']:.0f}s |")
    table = "\n".join(lines)
    if missing:
        table += "\n\nNot in the table: " + "; ".join(missing) + "."
    (out / "strategies.md").write_text(
        "# Strategies on the demo data\n\n"
        "Held-out topic accuracy (overall, example-weighted over organizations; each organization's own "
        "test split), SmolLM2-135M-Instruct, BBC News with label skew 0.8, "
        f"{BASE['local-steps']} local steps × batch {BASE['batch-size']} per round, LoRA r=8 on q/v "
        "(HetLoRA: global r=16, organizations at 4/8/16). 'worst org gain' is the smallest per-organization "
        "accuracy gain of the final round over the base model.\n\n"
        f"{table}\n\nReproduce: `{command}` (each arm's run — report.json, checkpoints, specialist — is kept "
        "under the output folder's runs/, git-ignored; an interrupted experiment resumes).\n\n"
        "![accuracy per round](strategies.png)\n")
    _plot(results, out / "strategies.png")
    print(table)


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["orgs"] for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False)
    for ax, orgs in zip(axes[0], sizes):
        for r in (r for r in results if r["orgs"] == orgs):
            ax.plot(range(len(r["accuracy"])), r["accuracy"], marker="o", label=r["arm"])
        ax.set_title(f"{orgs} organizations (label skew 0.8)")
        ax.set_xticks(range(max(len(r["accuracy"]) for r in results)))
        ax.set_xlabel("round (0 = base model)")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orgs", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--report-only", action="store_true",
                        help="no new runs: tabulate the arms that finished, list the others")
    parser.add_argument("--missing-reason", default="did not finish",
                        help="with --report-only: why the absent arms are absent")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, missing = [], []
    for orgs in args.orgs:
        for name in ARMS:
            result = run_arm(name, orgs, out, args.report_only)
            if result is None:
                missing.append(f"{name} with {orgs} organizations ({args.missing_reason})")
            else:
                results.append(result)
    command = "python -m simulations.experiments.compare_strategies --orgs " + " ".join(map(str, args.orgs))
    write_outputs(results, out, command, missing)


if __name__ == "__main__":
    main()
