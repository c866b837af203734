"""Bytes a job moves: every instruction pushed and every reply pulled, as Flower carries them.

``CountingGrid`` wraps the job's Grid, so every exchange — training, the four
of a secure-aggregation round, evaluation, and the late replies the
coordinator pulls only to discard — is counted in one place, from the
messages' contents (``server.validation.reply_bytes``: array data, config
values and metrics; Flower's framing is not included). Each round's summary
carries what that round moved (``bytes``: ``down`` to the organizations, ``up``
from them); the totals are the sums over the history, so a resumed job
counts what it moved before the crash too.

``check_budget`` enforces the job's ``comm-budget-mb``: before each round it
estimates what the round will move — the last trained round's bytes, or
before any, three times round 0's (the global adapter goes down once for
training and once for evaluation, and about as much comes back) — and the
job stops before a round that would pass the budget.
"""

from __future__ import annotations

from typing import Any, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from server.validation import reply_bytes


class CountingGrid:
    """A Grid that counts the bytes of the messages it pushes and pulls (everything else passes through)."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid
        self.down = 0
        self.up = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.down += sum(reply_bytes(m.content) for m in messages if m.has_content())
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self.up += sum(reply_bytes(r.content) for r in replies if not r.has_error() and r.has_content())
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.down += sum(reply_bytes(m.content) for m in messages if m.has_content())
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.up += sum(reply_bytes(r.content) for r in replies if not r.has_error() and r.has_content())
        return replies

    def take(self) -> dict[str, int]:
        """The bytes moved since the last call."""
        moved = {"down": self.down, "up": self.up}
        self.down = self.up = 0
        return moved

    def __getattr__(self, name: str) -> Any:  # get_node_ids, create_message, run, set_run, ...
        return getattr(self.inner, name)


def bytes_moved(history: list[dict[str, Any]]) -> dict[str, int]:
    """The job's totals: the sum of its rounds' ``bytes``."""
    down = sum(int(h.get("bytes", {}).get("down", 0)) for h in history)
    up = sum(int(h.get("bytes", {}).get("up", 0)) for h in history)
    return {"down": down, "up": up, "total": down + up}


class CommBudgetExhausted(RuntimeError):
    """The next round would move more bytes than the job's comm-budget-mb allows."""


def next_round_estimate(history: list[dict[str, Any]]) -> int:
    """Bytes the next round will move: the last trained round's, else 3 × round 0's."""
    trained = [h for h in history if h.get("round", 0) > 0 and "bytes" in h]
    if trained:
        moved = trained[-1]["bytes"]
        return int(moved["down"]) + int(moved["up"])
    first = next((h for h in history if "bytes" in h), None)
    return 3 * (int(first["bytes"]["down"]) + int(first["bytes"]["up"])) if first else 0


def check_budget(history: list[dict[str, Any]], server_round: int, budget_mb: float) -> None:
    """Raise CommBudgetExhausted when round ``server_round`` would pass ``budget_mb`` (0: none)."""
    if budget_mb <= 0:
        return
    spent, estimate = bytes_moved(history)["total"], next_round_estimate(history)
    if spent + estimate > budget_mb * 1e6:
        raise CommBudgetExhausted(
            f"communication budget: round {server_round} would move about {estimate / 1e6:.2f} MB more, "
            f"{(spent + estimate) / 1e6:.2f} MB in all > comm-budget-mb={budget_mb:g}; "
            f"spent {spent / 1e6:.2f} MB in {len(history)} round(s). The job stops before round "
            f"{server_round}; the last checkpoint is its result.")

