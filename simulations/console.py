"""What a person sees during a simulation: progress lines per reply, a table per round.

The lines and the per-round table are server/cli/round_table.py's, which
`silotune coordinator` prints too (from the job's events file); the final table
(base model vs specialist) is server/cli/report_table.py. Organization names and
rejection details came from the network: they are printed as rich Text
(``plain``), never read as markup.
"""

from __future__ import annotations

from typing import Any

from runtime.console import console
from server.cli.round_table import reply_line, round_started_line, round_table


class RichObserver:
    """RoundObserver that prints to the terminal."""

    def round_started(self, server_round: int, sampled: int) -> None:
        console.rule(round_started_line(server_round, sampled))

    def reply(self, server_round: int, org: str, accepted: bool, detail: str) -> None:
        console.print(reply_line(org, accepted, detail))

    def round_finished(self, server_round: int, summary: dict[str, Any]) -> None:
        table, lines = round_table(server_round, summary)
        console.print(table)
        for line in lines:
            console.print(line)
