"""The job's results for people and programs: report.json and a learning curve.

"base" is round 0 (the initial adapter is a no-op, so it scores the base
model; a continued job's round 0 scores the specialist it started from, named
in "init_adapter") and "specialist" is the last round, per organization and
overall, each on that organization's own held-out split. ``max_weight`` and
``capped_replies`` say how far one organization's example count could weigh
(``weight_cap``); the per-round history holds the rest, rejected evaluate
replies and refused name claims included.

With the job setting ``local-baseline`` each organization also scores a
local-only adapter it trained alone with the same budget
(clients/local_baseline.py) and sends those scores as ``local_*`` metrics:
"local" is the last round's, prefix stripped, with the organization's
``num_examples`` (the same examples); overall, weighted as the coordinator
weighs the others (server/job.py, ``overall_metrics``). A job without
local-only metrics has no "local" block.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from protos.records import LOCAL_METRIC_PREFIX
from server.job import overall_metrics

REPORT_FILE = "report.json"
CURVE_FILE = "learning_curve.png"


def weight_cap(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The example-count cap of the job's trained rounds and how many accepted
    updates it capped: ``max_weight`` (the last trained round's; None before
    any), ``capped_replies`` (None when a round ran under secure aggregation,
    where organizations cap their own weight unseen)."""
    trained = [h for h in history if "max_weight" in h]
    if not trained:
        return {"max_weight": None, "capped_replies": 0}
    secure = any(h.get("capped") is None for h in trained)
    return {"max_weight": trained[-1]["max_weight"],
            "capped_replies": None if secure else sum(len(h["capped"]) for h in trained)}


def build_report(history: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    if not history:
        raise ValueError("no evaluated round in the history")
    base, last = history[0], history[-1]
    organizations = {
        org: {"base": base["eval"].get(org, {}), "specialist": metrics}
        for org, metrics in last["eval"].items()
    }
    overall = {"base": base.get("eval_overall", {}), "specialist": last.get("eval_overall", {})}
    local = {org: local_only(metrics) for org, metrics in last["eval"].items()}
    if any(local.values()):
        for org, metrics in local.items():
            organizations[org]["local"] = metrics
        overall["local"] = overall_metrics({org: m for org, m in local.items() if m})
    return {
        **meta,
        **weight_cap(history),
        "rounds": last["round"],
        "organizations": organizations,
        "overall": overall,
        "history": history,
    }


def local_only(metrics: dict[str, float]) -> dict[str, float]:
    """An organization's local-only metrics, ``local_`` stripped, with its example count;
    {} when it sent none."""
    local = {key.removeprefix(LOCAL_METRIC_PREFIX): value for key, value in metrics.items() if key.startswith(LOCAL_METRIC_PREFIX)}
    if local and "num_examples" in metrics:
        local["num_examples"] = metrics["num_examples"]
    return local


def write_report(run_dir: Path, report: dict[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / REPORT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=True))
    tmp.replace(path)
    plot_learning_curve(report["history"], run_dir / CURVE_FILE)
    return path


def plot_learning_curve(history: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [h["round"] for h in history]
    orgs = sorted({org for h in history for org in h["eval"]})
    has_accuracy = any("accuracy" in m for h in history for m in h["eval"].values())
    panels = [("accuracy", "held-out accuracy")] if has_accuracy else []
    panels.append(("perplexity", "held-out answer perplexity"))
    local_overall = [overall_metrics({org: local for org, m in h["eval"].items() if (local := local_only(m))})
                     for h in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for org in orgs:
            values = [h["eval"].get(org, {}).get(key, math.nan) for h in history]
            ax.plot(rounds, values, marker="o", label=org, alpha=0.8)
        overall = [h.get("eval_overall", {}).get(key, math.nan) for h in history]
        ax.plot(rounds, overall, marker="s", color="black", linewidth=2.5, label="overall")
        if any(local_overall):
            ax.plot(rounds, [m.get(key, math.nan) for m in local_overall], marker="s", color="black",
                    linestyle="--", linewidth=1.5, label="overall, local-only")
        ax.set_xlabel("round (0 = base model)")
        ax.set_title(title)
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        if key == "perplexity":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
