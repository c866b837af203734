"""Column layouts: which columns of a silo hold the prompt and the answer.

A file format (``formats/``) gives named columns; a layout says how a row of
those columns becomes a raw (prompt, answer) pair for a task. ``build.py``
then validates, truncates and renders the pairs, whatever layout they came
from. Known layouts, tried in this order when the task is "auto":

* ``instruction``       — ``instruction`` + ``response`` (instruction task)
* ``classification``    — ``text`` + ``label`` (classification task)
* ``messages``          — TRL's conversational format: ``messages`` is a list of
  ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``
* ``prompt-completion`` — TRL's prompt-completion format: ``prompt`` +
  ``completion`` as two strings, or (conversational) as two message lists
* ``alpaca``            — ``instruction`` + ``output``, optional ``input``

Every layout but ``classification`` maps onto the instruction task:

* a conversation: the answer is the last assistant turn; the prompt is the
  system prompt(s), a blank line, then the turns before the answer. A single
  user turn is its text as is (so ``[user, assistant]`` gives the same example
  as ``instruction``/``response``); several turns are written one per
  paragraph as ``User: ...`` / ``Assistant: ...`` / ``Tool: ...``. Turns after
  the last assistant turn are ignored; blank turns are skipped. Anything more
  than one user turn and its answer also keeps its turns on the example
  (``Example.messages``): training then renders them with the base model's
  chat template, the loss on every assistant turn (clients/formatting.py).
* prompt-completion: prompt and completion as they are; conversational ones
  are the conversation ``prompt + completion`` (its last assistant turn must be
  in ``completion``).
* alpaca: the instruction, then a blank line and the input when it is not blank.

Rows whose prompt or answer field is missing, null or blank are dropped and
counted by ``build.py`` (as for every layout). A row whose structure is wrong
(a conversation that is not a list of role/content objects, an unknown role, a
non-string content, no assistant turn, a non-string alpaca ``input``) raises
``SiloMalformedRow`` naming the row (1 = the first data row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from .build import _as_text
from .errors import SiloMalformedRow
from .formats import RawTable

#: roles a conversation may hold, and how a turn is named in a multi-turn prompt
ROLES: dict[str, str] = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}

#: (prompt, answer) or, from the conversation layouts, (prompt, answer, conversation)
Pairs = Iterator[tuple[object, ...]]


@dataclass(frozen=True)
class Layout:
    """One column layout: the task it feeds, the columns it needs, how rows become pairs."""

    name: str
    task: str
    columns: tuple[str, ...]
    pairs: Callable[[RawTable, str], Pairs]

    def describe(self) -> str:
        return f"{self.name} ({' + '.join(repr(c) for c in self.columns)})"


def _plain(first: str, second: str) -> Callable[[RawTable, str], Pairs]:
    def pairs(table: RawTable, source: str) -> Pairs:
        return zip(table.column(first), table.column(second))

    return pairs


def _malformed(source: str, row: int, column: str, problem: str) -> SiloMalformedRow:
    return SiloMalformedRow(f"{source}: row {row}: {column!r} {problem}")


def _turns(value: object, source: str, row: int, column: str) -> list[tuple[str, str]]:
    """A message list -> [(role, content)]; SiloMalformedRow when it is not one."""
    if not isinstance(value, list):
        raise _malformed(source, row, column, "must be a list of {'role', 'content'} objects, "
                                               f"got {type(value).__name__}")
    turns = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _malformed(source, row, column, f"message {i} is not a {{'role', 'content'}} object")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise _malformed(source, row, column, f"message {i} has unknown role {role!r}; "
                                                   f"known roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _malformed(source, row, column, f"message {i} ({role}) has a {type(content).__name__} "
                                                   "content, not a string")
        turns.append((role, content))
    return turns


def _conversation_pair(turns: list[tuple[str, str]], source: str, row: int, column: str,
                       answer_from: int = 0) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """(prompt, answer, conversation) of a conversation whose answer is its last assistant turn (at index
    >= answer_from); the conversation is empty for one user turn and its answer."""
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
    if last < answer_from:
        where = "" if answer_from == 0 else " in 'completion'"
        raise _malformed(source, row, column, f"has no assistant turn{where} (the answer)")
    system: list[str] = []
    dialog: list[tuple[str, str]] = []
    for role, content in turns[:last]:
        text = _as_text(content)
        if text is None:  # a blank turn says nothing
            continue
        if role == "system":
            system.append(text)
        else:
            dialog.append((role, text))
    if not dialog:
        raise _malformed(source, row, column, "has no user turn before its last assistant turn")
    if len(dialog) == 1 and dialog[0][0] == "user":
        body = dialog[0][1]
    else:
        body = "\n\n".join(f"{ROLES[role]}: {text}" for role, text in dialog)
    answer = turns[last][1]
    single_exchange = not system and len(dialog) == 1 and dialog[0][0] == "user"
    # the structure is kept when the flattened prompt loses it: encoded with the chat template
    conversation = () if single_exchange else tuple(
        [("system", text) for text in system] + dialog + [("assistant", answer)])
    return "\n\n".join([*system, body]), answer, conversation


def _messages_pairs(table: RawTable, source: str) -> Pairs:
    for row, value in enumerate(table.column("messages"), start=1):
        if value is None:
            yield None, None  # dropped and counted, like any missing field
            continue
        yield _conversation_pair(_turns(value, source, row, "messages"), source, row, "messages")


def _prompt_completion_pairs(table: RawTable, source: str) -> Pairs:
    for row, (prompt, completion) in enumerate(zip(table.column("prompt"), table.column("completion")),
                                               start=1):
        if isinstance(prompt, list) or isinstance(completion, list):
            if prompt is None or completion is None:
                yield None, None
                continue
            if not (isinstance(prompt, list) and isinstance(completion, list)):
                raise _malformed(source, row, "prompt", "and 'completion' must both be strings or both "
                                                        "message lists (conversational)")
            head = _turns(prompt, source, row, "prompt")
            tail = _turns(completion, source, row, "completion")
            yield _conversation_pair(head + tail, source, row, "completion", answer_from=len(head))
        else:
            yield prompt, completion


def _alpaca_pairs(table: RawTable, source: str) -> Pairs:
    rows = zip(table.column("instruction"), table.column("input"), table.column("output"))
    for row, (instruction, extra, output) in enumerate(rows, start=1):
        if extra is not None and not isinstance(extra, str):
            raise _malformed(source, row, "input", f"is a {type(extra).__name__}, not a string")
        text, extra_text = _as_text(instruction), _as_text(extra)
        if text is not None and extra_text is not None:
            yield f"{text}\n\n{extra_text}", output
        else:
            yield instruction, output


#: every layout, in the order "auto" tries them
LAYOUTS: tuple[Layout, ...] = (
    Layout("instruction", "instruction", ("instruction", "response"), _plain("instruction", "response")),
    Layout("classification", "classification", ("text", "label"), _plain("text", "label")),
    Layout("messages", "instruction", ("messages",), _messages_pairs),
    Layout("prompt-completion", "instruction", ("prompt", "completion"), _prompt_completion_pairs),
    Layout("alpaca", "instruction", ("instruction", "output"), _alpaca_pairs),
)


#: the layouts whose rows are conversations: the only ones a chat task accepts
CHAT_LAYOUTS = ("messages", "prompt-completion")


def known_layouts(task: str | None = None) -> str:
    """The layouts (of ``task``, or all) for error messages: "instruction ('instruction' + 'response'), ..."."""
    return ", ".join(layout.describe() for layout in LAYOUTS if task is None or layout.task == task)


def matching_layouts(columns: tuple[str, ...], task: str | None = None) -> list[Layout]:
    """The layouts whose columns are all present (of ``task``, or any), in LAYOUTS order."""
    found = set(columns)
    return [layout for layout in LAYOUTS
            if (task is None or layout.task == task) and found.issuperset(layout.columns)]
