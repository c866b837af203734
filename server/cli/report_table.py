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


def report_table(report: dict[str, Any]) -> Table:
    """Base model vs federated specialist, per organization and overall."""
    has_accuracy = any("accuracy" in m["base"] for m in report["organizations"].values())
    table = Table(title=plain(f"{report['job_id']}: base model vs federated specialist "
                              f"({report['rounds']} rounds, {report['strategy']}) — held-out split of each organization",
                              500))
    table.add_column("organization")
    table.add_column("test examples", justify="right")
    if has_accuracy:
        for column in ("base acc", "specialist acc", "Δ acc"):
            table.add_column(column, justify="right")
    for column in ("base ppl", "specialist ppl"):
        table.add_column(column, justify="right")
    rows = list(report["organizations"].items()) + [("overall", report["overall"])]
    for org, pair in rows:
        base, spec = pair["base"], pair["specialist"]
        cells: list[Text | str] = [plain(org), f"{int(spec.get('num_examples', 0))}"]
        if has_accuracy:
            delta = spec.get("accuracy", math.nan) - base.get("accuracy", math.nan)
            cells += [format_metric(base.get("accuracy"), "accuracy"), format_metric(spec.get("accuracy"), "accuracy"),
                      f"{delta:+.3f}"]
        cells += [format_metric(base.get("perplexity"), "ppl"), format_metric(spec.get("perplexity"), "ppl")]
        table.add_row(*cells)
    return table
