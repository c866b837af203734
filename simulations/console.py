"""What a person sees during a simulation: progress lines per reply, a table per round.

The final table (base model vs specialist) is server/cli/report_table.py,
which `silotune coordinator` prints too. Organization names and rejection
details came from the network: they are printed as rich Text (``plain``),
never read as markup.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from runtime.console import console
from server.cli.report_table import format_metric, plain


class RichObserver:
    """RoundObserver that prints to the terminal."""

    def round_started(self, server_round: int, sampled: int) -> None:
        console.rule(f"round {server_round}: {sampled} organization(s) training")

    def reply(self, server_round: int, org: str, accepted: bool, detail: str) -> None:
        mark = Text("✓", style="green") if accepted else Text("✗ rejected", style="red")
        console.print(Text.assemble("  ", mark, " ", plain(org), "  ", plain(detail, 500)))

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
            table.add_row(plain(org), f"{int(metrics.get('num_examples', 0))}",
                          format_metric(metrics.get("accuracy"), "accuracy"),
                          format_metric(metrics.get("perplexity"), "ppl"))
        console.print(table)
        for rejection in summary.get("eval_rejected", []):
            console.print(Text.assemble("  ", Text("✗ evaluation rejected", style="red"), " ",
                                        plain(rejection["org"]), "  ",
                                        plain(f"{rejection['reason']}: {rejection['detail']}", 500)))
