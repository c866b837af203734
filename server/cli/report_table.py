"""The final table of a job's report (report.json), for `silotune coordinator` and `silotune simulate`.

Organization names came from the network (a claim, or an enrolled name): every
cell and the title are rich Text, never markup, so a name such as ``[/bold]``
is printed as written and cannot break or restyle the table.
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table
from rich.text import Text

from server.validation import network_text


def format_metric(value: float | None, kind: str) -> str:
    """An accuracy with 3 decimals, anything else with 2; '—' for none or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}" if kind == "accuracy" else f"{value:.2f}"


def plain(value: object, limit: int = 200) -> Text:
    """Text from the network (or a report file) as a rich cell: printable, no markup."""
    return Text(network_text(value, limit))


#: the report's metric name (the job's task spec) → (the metric's key, its column header)
SCORES = {"accuracy": ("accuracy", "acc"), "macro-f1": ("macro_f1", "F1"), "exact-match": ("exact_match", "EM")}


def report_table(report: dict[str, Any]) -> Table:
    """Base model vs federated specialist, per organization and overall, on the job's headline
    metric (accuracy, macro-F1 or exact match) and perplexity. With local-only metrics in the report
    (job setting local-baseline) also each organization's local-only adapter (trained alone with
    the same budget), and the gain of federating over training alone: federated − local-only
    score, or without a score federated ÷ local-only perplexity (below 1: better)."""
    rows = list(report["organizations"].items()) + [("overall", report["overall"])]
    with_local = "local" in report["overall"]
    score = _score_key(report, rows)
    stages = ("base", "local", "specialist") if with_local else ("base", "specialist")
    names = {"base": "base", "local": "local", "specialist": "federated" if with_local else "specialist"}
    versus = "local-only vs federated specialist" if with_local else "federated specialist"
    start = report.get("init_adapter")  # continued training: round 0 scored the specialist it started from
    start_name = f"the start ({start.get('specialist') or 'init-adapter'})" if isinstance(start, dict) else "base model"
    table = Table(title=plain(f"{report['job_id']}: {start_name} vs {versus} ({report['rounds']} rounds, "
                              f"{report['strategy']}) — held-out split of each organization", 500))
    # short headers: nine columns fit a 120-column log without truncating a name
    table.add_column("organization")
    table.add_column("examples" if with_local else "test examples", justify="right")
    if score:
        header = SCORES.get(report.get("metric", ""), (score, "acc"))[1]
        for stage in stages:
            table.add_column(f"{names[stage]} {header}", justify="right")
        table.add_column("Δ vs local" if with_local else f"Δ {header}", justify="right")
    for stage in stages:
        table.add_column(f"{names[stage]} ppl", justify="right")
    if with_local and not score:
        table.add_column("ppl vs local", justify="right")
    for org, pair in rows:
        metrics = {stage: pair.get(stage, {}) for stage in stages}
        cells: list[Text | str] = [plain(org), f"{int(metrics['specialist'].get('num_examples', 0))}"]
        if score:
            cells += [format_metric(metrics[stage].get(score), "accuracy") for stage in stages]
            cells.append(_difference(metrics["specialist"].get(score), metrics[stages[-2]].get(score)))
        cells += [format_metric(metrics[stage].get("perplexity"), "ppl") for stage in stages]
        if with_local and not score:
            cells.append(_ratio(metrics["specialist"].get("perplexity"), metrics["local"].get("perplexity")))
        table.add_row(*cells)
    return table


def _score_key(report: dict[str, Any], rows: list[tuple[str, Any]]) -> str | None:
    """The headline score's metric key: the job's metric if it is a score, else accuracy when
    reported; None when only perplexity applies."""
    wanted = SCORES.get(report.get("metric", ""), ("accuracy", ""))[0]
    for key in (wanted, "accuracy"):
        if any(key in pair.get(stage, {}) for _, pair in rows for stage in ("base", "specialist")):
            return key
    return None


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _difference(value: float | None, reference: float | None) -> str:
    return "—" if _missing(value) or _missing(reference) else f"{value - reference:+.3f}"  # type: ignore[operator]


def _ratio(value: float | None, reference: float | None) -> str:
    if _missing(value) or _missing(reference) or not reference:
        return "—"
    return f"×{value / reference:.2f}"  # type: ignore[operator]
