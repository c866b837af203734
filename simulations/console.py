"""What a person sees: progress lines per reply, a table per round, the final table."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

# Not a terminal (CI, `make demo | tee`): rich would wrap tables at 80 columns.
console = Console(highlight=False, width=None if Console().is_terminal else 120)


def _fmt(value: float | None, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}" if kind == "accuracy" else f"{value:.2f}"


class RichObserver:
    """RoundObserver that prints to the terminal."""

    def round_started(self, server_round: int, sampled: int) -> None:
        console.rule(f"round {server_round}: {sampled} organization(s) training")

    def reply(self, server_round: int, org: str, accepted: bool, detail: str) -> None:
        mark = "[green]✓[/green]" if accepted else "[red]✗ rejected[/red]"
        console.print(f"  {mark} {org}  {detail}")

    def round_finished(self, server_round: int, summary: dict[str, Any]) -> None:
        title = "round 0: base model" if server_round == 0 else f"round {server_round}"
        extra = ""
        if "train_seconds" in summary:
            extra = f" — train {summary['train_seconds']:.0f}s, loss {summary['train_loss']:.3f}"
        table = Table(title=f"{title}{extra} — eval {summary.get('eval_seconds', 0):.0f}s")
        for column in ("organization", "examples", "accuracy", "perplexity"):
            table.add_column(column, justify="right" if column != "organization" else "left")
        rows = list(summary.get("eval", {}).items()) + [("overall", summary.get("eval_overall", {}))]
        for org, metrics in rows:
            table.add_row(org, f"{int(metrics.get('num_examples', 0))}",
                          _fmt(metrics.get("accuracy"), "accuracy"), _fmt(metrics.get("perplexity"), "ppl"))
        console.print(table)


def report_table(report: dict[str, Any]) -> Table:
    """Base model vs federated specialist, per organization and overall."""
    has_accuracy = any("accuracy" in m["base"] for m in report["organizations"].values())
    table = Table(title=f"{report['job_id']}: base model vs federated specialist "
                        f"({report['rounds']} rounds, {report['strategy']}) — held-out split of each organization")
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
        cells = [org, f"{int(spec.get('num_examples', 0))}"]
        if has_accuracy:
            delta = spec.get("accuracy", math.nan) - base.get("accuracy", math.nan)
            cells += [_fmt(base.get("accuracy"), "accuracy"), _fmt(spec.get("accuracy"), "accuracy"),
                      f"{delta:+.3f}"]
        cells += [_fmt(base.get("perplexity"), "ppl"), _fmt(spec.get("perplexity"), "ppl")]
        table.add_row(*cells)
    return table
