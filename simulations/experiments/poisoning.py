"""Poisoning: 20% of the organizations attack; plain FedAvg against a robust strategy.

Arms: {no attack, sign-flip, ×10-scaled, sign-flip ×10} × {FedAvg, coordinate-wise
median, Multi-Krum}, in simulation, with the run-config key ``sim-attack`` (clients/attacks.py —
it exists only for experiments like this one and acts only on virtual
organizations). Writes docs/poisoning.md: held-out accuracy per round and the
final accuracy next to the clean run's.

    python -m simulations.experiments.poisoning                      # SmolLM2-135M, 5 organizations
    python -m simulations.experiments.poisoning --model tiny-llama --attacks flip10
        # minutes; docs/poisoning-tiny-llama.md. The random tiny model learns next to
        # nothing, which docs/poisoning.md then reports next to the real table.

Sized for a 2-core CPU: 5 organizations (so 20% is exactly one attacker),
2 rounds. Each arm's run (report.json, checkpoints) is kept under
docs/runs/poisoning/ (git-ignored); an interrupted experiment resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from clients.attacks import attackers
from simulations.experiments.arms import run_once
from simulations.scenario import Scenario

ORGS = 5
#: name on the command line -> (name in the table, sim-attack run-config value)
ATTACKS = {"none": ("none", ""), "sign-flip": ("sign-flip", "sign-flip:0.2"),
           "scale10": ("×10-scaled", "scale10:0.2"), "flip10": ("sign-flip ×10", "flip10:0.2")}
DEFAULT_ATTACKS = ["sign-flip", "scale10"]  # the two; flip10 on request
STRATEGIES = {
    "FedAvg": {"strategy": "fedavg"},
    "median": {"strategy": "median"},  # coordinate-wise
    # Multi-Krum: drop the f=1 update farthest from the others, average the n − f = 4 left
    "Multi-Krum": {"strategy": "krum", "strategy-params": "num_malicious=1,num_to_select=4"},
}

BASE: dict[str, Any] = {
    "model": "smollm2-135m",
    "num-rounds": 2,
    "min-nodes": ORGS,
    "lora-r": 8,
    "lora-alpha": 16.0,
    "local-steps": 10,
    "batch-size": 4,
    "learning-rate": 0.001,
    "max-length": 128,
    "eval-max-examples": 30,
    "sim-dataset": "bbc-news",
    # 0.5, not the demo's 0.8: with 5 organizations and 5 topics, 0.8 makes each organization
    # nearly the only holder of one topic, so ANY defence that sets the attacker's update aside
    # also loses that topic — the table would measure the data lost, not the attack resisted.
    "sim-skew": 0.5,
    "sim-max-records": 150,
    "seed": 0,
}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def run_arm(attack: str, strategy: str, base: dict[str, Any], out: Path) -> dict[str, Any]:
    name = f"{attack}-{slug(strategy)}"
    run_dir = out / "runs" / "poisoning" / base["model"] / name
    settings = {**base, **STRATEGIES[strategy], "sim-attack": ATTACKS[attack][1],
                "job-id": f"poisoning-{name}", "run-dir": str(run_dir)}
    scenario = Scenario(name=f"poisoning-{name}", num_organizations=ORGS, run_config=settings)
    done = run_once(scenario)
    assert done is not None
    report, wall = done
    history = report["history"]
    return {
        "attack": ATTACKS[attack][0],
        "strategy": strategy,
        "accuracy": [h["eval_overall"].get("accuracy", math.nan) for h in history],
        "loss": [h["eval_overall"].get("loss", math.nan) for h in history],
        "examples": history[-1]["eval_overall"].get("num_examples", 0),
        "wall_s": wall,
    }


def table(results: list[dict[str, Any]]) -> str:
    clean = {r["strategy"]: r["accuracy"][-1] for r in results if r["attack"] == "none"}
    rounds = len(results[0]["accuracy"])
    lines = ["| attack (20% of orgs) | strategy | " + " | ".join(
        "base" if i == 0 else f"round {i}" for i in range(rounds))
        + " | final − clean (same strategy) | final − clean FedAvg | eval loss | wall |",
        "|---|---|" + "---:|" * (rounds + 4)]
    for r in results:
        final = r["accuracy"][-1]
        lines.append(
            f"| {r['attack']} | {r['strategy']} | " + " | ".join(f"{a:.3f}" for a in r["accuracy"])
            + f" | {100 * (final - clean[r['strategy']]):+.1f} pts | {100 * (final - clean['FedAvg']):+.1f} pts"
            + f" | {r['loss'][-1]:.3f} | {r['wall_s']:.0f}s |")
    return "\n".join(lines)


def verdicts(results: list[dict[str, Any]]) -> str:
    """One line per attack, computed from the table: the claims, checked.

    The yardstick is the clean FedAvg run — the specialist the federation would have had
    without attackers. A robust strategy's own clean run is shown too, but it is no
    yardstick: Multi-Krum told to expect f = 1 attacker sets one update aside every round,
    so without attackers it discards an honest organization's work."""
    final = {(r["attack"], r["strategy"]): r["accuracy"][-1] for r in results}
    base = results[0]["accuracy"][0]
    clean = final["none", "FedAvg"]
    lines = ["- Clean: " + ", ".join(f"{s} {final['none', s]:.3f}" for s in STRATEGIES)
             + f" (base model {base:.3f})."]
    for attack in dict.fromkeys(r["attack"] for r in results if r["attack"] != "none"):
        fedavg = final[attack, "FedAvg"]
        parts = [f"FedAvg {fedavg:.3f} ({100 * (fedavg - clean):+.1f} pts against the clean FedAvg run)"]
        for robust in (s for s in STRATEGIES if s != "FedAvg"):
            got = final[attack, robust]
            gap = 100 * (got - clean)
            parts.append(f"{robust} {got:.3f} ({gap:+.1f} pts: {'within' if abs(gap) <= 2.0 else 'NOT within'} "
                         f"2 points of the clean run; {100 * (got - final['none', robust]):+.1f} against its own "
                         f"clean run)")
        lines.append(f"- {attack}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def tiny_note(out: Path) -> str:
    """Why not the tiny model: what it did in `--model tiny-llama` runs, if there are any."""
    rows = []
    for arm in sorted((out / "runs" / "poisoning" / "tiny-llama").glob("*/report.json")):
        history = json.loads(arm.read_text())["history"]
        accuracy = [h["eval_overall"].get("accuracy", math.nan) for h in history]
        rows.append(f"{arm.parent.name}: " + " → ".join(f"{a:.3f}" for a in accuracy))
    if not rows:
        return ""
    return ("\nThe tiny random model (`--model tiny-llama`, the model of the test suite) is not used for the "
            "table: it learns next to nothing in a few rounds, so there is nothing for an attack to destroy "
            "and nothing for a robust strategy to keep. Its held-out accuracy per round in the same setting "
            "(learning rate 0.01, 10 local steps): " + "; ".join(rows) + ".\n")


def write_doc(results: list[dict[str, Any]], base: dict[str, Any], out: Path, command: str) -> None:
    chosen = sorted(attackers(ORGS, 0.2, base["seed"]))
    examples = int(results[0]["examples"])
    wall = sum(r["wall_s"] for r in results)
    text = f"""# Poisoning: 20% attackers, FedAvg vs a robust strategy

{ORGS} virtual organizations, one of which (20%: partition {chosen}, chosen deterministically
from the seed) is an attacker. It trains honestly, then sends instead of its trained adapter
`global + f·Δ` with Δ = trained − global: f = −1 (sign-flip), f = 10 (×10-scaled), f = −10
(both). Model `{base['model']}`, BBC News topics with label skew {base['sim-skew']},
{base['num-rounds']} rounds of {base['local-steps']} local steps × batch {base['batch-size']},
LoRA r={base['lora-r']} on q/v, learning rate {base['learning-rate']}. Accuracy: held-out topic
accuracy, example-weighted over the organizations' own test splits ({examples} examples in all,
so one example is {100 / max(examples, 1):.1f} points). Label skew {base['sim-skew']}, not the demo's
0.8: with 5 organizations and 5 topics, 0.8 makes each organization nearly the only holder of
one topic, and any defence that sets the attacker's update aside also loses that topic's data —
the comparison would then measure the data lost rather than the attack resisted. Robust strategies: the coordinate-wise
median of the updates, and Multi-Krum (f = 1: the 4 of 5 updates closest to the others,
averaged).

{table(results)}

Reproduce: `{command}` ({wall / 60:.0f} minutes of simulation on this 2-core CPU, shared with
other work; each arm's run is kept under docs/runs/poisoning/, git-ignored).

## What this run shows

The yardstick is the clean FedAvg run: the specialist the federation would have had without
attackers ("final − clean FedAvg"). One held-out example is {100 / max(examples, 1):.1f} points, so
"within 2 points" means within {int(2 // (100 / max(examples, 1)))} examples.

{verdicts(results)}
{tiny_note(out) if base["model"] != "tiny-llama" else ""}

The attack switch (`sim-attack`, clients/attacks.py) exists only for experiments: it acts only
on virtual organizations of the Simulation Engine (those with a `partition-id`), never on a
deployed agent.
"""
    name = "poisoning.md" if base["model"] == BASE["model"] else f"poisoning-{base['model']}.md"
    (out / name).write_text(text)
    print(table(results))


def main() -> None:
    # Ray starts its workers at niceness 15: on a CPU shared with other work they starve
    # (an arm took 20 minutes to evaluate round 0 here). Run them at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BASE["model"], help="smollm2-135m (default) or tiny-llama")
    parser.add_argument("--attacks", nargs="+", default=DEFAULT_ATTACKS, choices=list(ATTACKS),
                        help=f"attacks to run besides 'none' (always run); default: {' '.join(DEFAULT_ATTACKS)}")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(BASE, model=args.model)
    if args.model == "tiny-llama":  # the random model needs a bigger step to move at all
        base.update({"learning-rate": 0.01, "local-steps": 10})
    attacks = ["none", *[a for a in args.attacks if a != "none"]]
    results = [run_arm(attack, strategy, base, out) for attack in attacks for strategy in STRATEGIES]
    command = "python -m simulations.experiments.poisoning" + (
        f" --model {args.model}" if args.model != BASE["model"] else "") + (
        f" --attacks {' '.join(args.attacks)}" if args.attacks != DEFAULT_ATTACKS else "")
    write_doc(results, base, out, command)


if __name__ == "__main__":
    main()
