"""The rounds as a person reads them: a line when a round starts, one per reply, a table when it ends.

`silotune simulate` prints these as its round loop reports them
(simulations/console.py); `silotune coordinator` prints the same from the job's
events file (server/events.py), which the ServerApp writes in another process.
Organization names, rejection details and whatever the events file holds came
from the network: they are rich Text (``plain``), never markup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from rich.console import RenderableType
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from server.cli.report_table import format_metric, plain
from server.events import REPLY, ROUND_FINISHED, ROUND_STARTED, Event

#: columns shown only when some organization's evaluation carries the metric:
#: (metric key, column, format kind of format_metric)
OPTIONAL_COLUMNS = (
    ("macro_f1", "macro F1", "accuracy"),
    ("exact_match", "exact match", "accuracy"),
)
#: a local-only adapter's metrics (run config local-baseline=true), next to the federated ones
LOCAL_COLUMNS = (
    ("local_accuracy", "local-only acc", "accuracy"),
    ("local_perplexity", "local-only ppl", "ppl"),
)

TITLE_WIDTH = 116   # the widest a table grows to keep its title on one line (runtime.console: 120)


class RoundTable(NamedTuple):
    table: Table
    lines: list[Text]   # what the table cannot show: evaluations refused, organizations that never replied


def round_started_line(server_round: int, sampled: int) -> Text:
    return Text(f"round {server_round}: {sampled} organization(s) sampled")


def reply_line(org: object, accepted: bool, detail: object) -> Text:
    mark = Text("✓", style="green") if accepted else Text("✗ rejected", style="red")
    return Text.assemble("  ", mark, " ", plain(org), "  ", plain(detail, 500))


def round_table(server_round: int, summary: Mapping[str, Any]) -> RoundTable:
    """The round's evaluation per organization and overall, titled with how the round went."""
    headline = _headline(server_round, summary)
    rows = _rows(summary)
    columns = [("accuracy", "accuracy", "accuracy"), *_present(OPTIONAL_COLUMNS, rows),
               ("perplexity", "perplexity", "ppl"), *_present(LOCAL_COLUMNS, rows)]
    # at least as wide as its title, so the title stays on one line
    table = Table(title=headline, min_width=min(len(headline.plain) + 4, TITLE_WIDTH))
    table.add_column("organization")
    table.add_column("examples", justify="right")
    for _, column, _ in columns:
        table.add_column(column, justify="right")
    for org, metrics in rows:
        examples = _number(metrics.get("num_examples"))
        table.add_row(plain(org), f"{int(examples)}" if examples is not None and math.isfinite(examples) else "—",
                      *[_metric(metrics.get(key), kind) for key, _, kind in columns])
    return RoundTable(table, _notes(summary))


def render_event(event: Event) -> list[RenderableType]:
    """What to print for one event of an events file (the events file's own words, as text)."""
    kind, server_round = event.get("event"), event.get("round")
    if not isinstance(server_round, int):
        return []
    if kind == ROUND_STARTED:
        sampled = event.get("sampled")
        return [Rule(round_started_line(server_round, sampled if isinstance(sampled, int) else 0))]
    if kind == REPLY:
        return [reply_line(event.get("org", ""), event.get("accepted") is True, event.get("detail", ""))]
    if kind == ROUND_FINISHED:
        summary = event.get("summary")
        table, lines = round_table(server_round, summary if isinstance(summary, Mapping) else {})
        return [table, *lines]
    return []


def _headline(server_round: int, summary: Mapping[str, Any]) -> Text:
    parts = [f"round {server_round} done"]
    if server_round == 0:
        parts.append("the base model")
    else:
        accepted, rejected = summary.get("accepted"), summary.get("rejected")
        counts = [f"{summary.get('sampled', '?')} sampled"]
        if isinstance(accepted, list):
            counts.append(f"{len(accepted)} accepted")
        if isinstance(rejected, list):
            counts.append(f"{len(rejected)} rejected")
        parts.append(", ".join(counts))
        seconds = _number(summary.get("train_seconds"))
        if seconds is not None:
            loss = _number(summary.get("train_loss"))
            parts.append(f"train {seconds:.0f}s, loss " + ("—" if loss is None else f"{loss:.3f}"))
    seconds = _number(summary.get("eval_seconds"))
    if seconds is not None:
        parts.append(f"eval {seconds:.0f}s")
    moved = summary.get("bytes")
    if isinstance(moved, Mapping):
        down, up = _number(moved.get("down")), _number(moved.get("up"))
        if down is not None and up is not None:
            parts.append(f"{down / 1e6:.2f} MB down, {up / 1e6:.2f} MB up")
    return plain(" — ".join(parts), 500)


def _notes(summary: Mapping[str, Any]) -> list[Text]:
    notes = []
    for rejection in _records(summary.get("eval_rejected")):
        notes.append(Text.assemble("  ", Text("✗ evaluation rejected", style="red"), " ",
                                   plain(rejection.get("org", "")), "  ",
                                   plain(f"{rejection.get('reason', '')}: {rejection.get('detail', '')}", 500)))
    timed_out = summary.get("timed_out")
    if isinstance(timed_out, list) and timed_out:
        notes.append(Text.assemble("  ", Text("no update in time from", style="yellow"), " ",
                                   plain(", ".join(str(org) for org in timed_out), 500)))
    return notes


def _rows(summary: Mapping[str, Any]) -> list[tuple[object, Mapping[str, Any]]]:
    """(organization, its metrics) in the summary's order, then ("overall", the pooled metrics)."""
    per_org = summary.get("eval")
    rows = [*(per_org.items() if isinstance(per_org, Mapping) else ()), ("overall", summary.get("eval_overall"))]
    return [(org, metrics if isinstance(metrics, Mapping) else {}) for org, metrics in rows]


def _present(columns: tuple[tuple[str, str, str], ...],
             rows: list[tuple[object, Mapping[str, Any]]]) -> list[tuple[str, str, str]]:
    return [column for column in columns if any(column[0] in metrics for _, metrics in rows)]


def _records(value: object) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _number(value: object) -> float | None:
    """A number from a summary (or an events file): None for anything else, NaN included."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if isinstance(value, float) and math.isnan(value) else float(value)


def _metric(value: object, kind: str) -> str | Text:
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_metric(_number(value), kind)
    return plain(value, 40)   # not a number: shown as the text it is
