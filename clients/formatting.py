"""Examples → token ids: the chat template, answer-only labels, truncation.

The loss is on the answer tokens only (labels are -100 elsewhere): the model
learns to answer, not to reproduce the organization's documents. A
multi-turn conversation is rendered with the base model's chat template and
the loss is on every assistant turn; evaluation scores its last one only.
The job's system prompt (protos/task_spec.py) opens every example that has
no system turn of its own.

Over-long examples are cut in the *middle* of the prompt: the head carries
the instruction, the tail carries the question's end ("...Category:") and the
template's assistant marker, both of which the answer depends on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from protos.task_spec import TaskSpec

IGNORE_INDEX = -100
_PROMPT_TAIL_TOKENS = 24


@dataclass(frozen=True)
class EncodedExample:
    prompt_ids: list[int]
    answer_ids: list[int]
    truncated: bool
    #: training labels of the prompt part: the earlier assistant turns of a
    #: conversation; None when the whole prompt is context (-100)
    prompt_labels: list[int] | None = None
    answer_truncated: bool = False   # the answer itself was cut (it may use half of max_length)

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids

    @property
    def labels(self) -> list[int]:
        """What training learns: every assistant turn."""
        head = self.prompt_labels if self.prompt_labels is not None else [IGNORE_INDEX] * len(self.prompt_ids)
        return head + self.answer_ids

    @property
    def answer_labels(self) -> list[int]:
        """What evaluation scores: the final answer only."""
        return [IGNORE_INDEX] * len(self.prompt_ids) + self.answer_ids


Message = dict[str, str]


def _with_system(messages: list[Message], system_prompt: str) -> list[Message]:
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render_conversation(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    """The model's chat template, or a plain "### Role:" layout for a model without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if len(messages) == 1 and messages[0]["role"] == "user" and add_generation_prompt:
        return f"### Instruction:\n{messages[0]['content']}\n\n### Response:\n"
    text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    return text + ("### Assistant:\n" if add_generation_prompt else "")


def render_prompt(tokenizer: Any, prompt: str, system_prompt: str = "") -> str:
    """The prompt as the model sees it, ending where the answer starts."""
    return render_conversation(tokenizer, _with_system([{"role": "user", "content": prompt}], system_prompt),
                               add_generation_prompt=True)


def answer_suffix(tokenizer: Any) -> str:
    """What ends an answer: the template's end-of-turn token."""
    return tokenizer.eos_token or ""


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _conversation_prompt(tokenizer: Any, turns: Sequence[tuple[str, str]],
                         system_prompt: str) -> tuple[list[int], list[int]]:
    """Token ids and training labels of a conversation up to its last answer.

    Each assistant turn before the last is found by rendering the
    conversation up to it (with the generation prompt) and through it: the
    difference is that turn as the template writes it, and it is learned.
    A template that re-renders earlier turns differently (so one rendering is
    not a prefix of the next) gets no such labels: only the final answer is
    learned, which is still correct, just less."""
    messages = _with_system([{"role": role, "content": content} for role, content in turns[:-1]], system_prompt)
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_conversation(tokenizer, messages[:k], add_generation_prompt=True)
        through = render_conversation(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (before.startswith(done) and through.startswith(before)):
            break
        context, answer = _tokens(tokenizer, before[len(done):]), _tokens(tokenizer, through[len(before):])
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = through
    final = render_conversation(tokenizer, messages, add_generation_prompt=True)
    if not final.startswith(done):  # see above: fall back to the final answer alone
        return _tokens(tokenizer, final), [IGNORE_INDEX] * len(_tokens(tokenizer, final))
    tail = _tokens(tokenizer, final[len(done):])
    return ids + tail, labels + [IGNORE_INDEX] * len(tail)


def encode_example(tokenizer: Any, prompt: str, answer: str, max_length: int, *,
                   messages: Sequence[tuple[str, str]] = (), system_prompt: str = "") -> EncodedExample:
    """Token ids of one example; ``messages`` (a conversation ending in ``answer``) replaces ``prompt``."""
    if messages:
        prompt_ids, prompt_labels = _conversation_prompt(tokenizer, messages, system_prompt)
    else:
        prompt_ids, prompt_labels = _tokens(tokenizer, render_prompt(tokenizer, prompt, system_prompt)), None
    answer_ids = _tokens(tokenizer, answer + answer_suffix(tokenizer))
    truncated = answer_truncated = False
    # the answer may use at most half of the budget; the prompt gets the rest
    if len(answer_ids) > max_length // 2 and len(prompt_ids) + len(answer_ids) > max_length:
        answer_ids = answer_ids[: max(max_length // 2, max_length - len(prompt_ids))]
        truncated = answer_truncated = True
    budget = max_length - len(answer_ids)
    if len(prompt_ids) > budget:
        tail = min(_PROMPT_TAIL_TOKENS, budget // 2)
        prompt_ids = _cut_middle(prompt_ids, budget, tail)
        prompt_labels = _cut_middle(prompt_labels, budget, tail) if prompt_labels is not None else None
        truncated = True
    if prompt_labels is not None and all(label == IGNORE_INDEX for label in prompt_labels):
        prompt_labels = None
    return EncodedExample(prompt_ids, answer_ids, truncated, prompt_labels, answer_truncated)


def _cut_middle(values: list[int], budget: int, tail: int) -> list[int]:
    return values[: budget - tail] + values[len(values) - tail :]


def prompt_format(spec: "TaskSpec", kind: str, labels: Sequence[str], tokenizer: Any) -> str:
    """The prompt as the model sees it, with placeholders where a row's fields go (no record).

    A chat row is its own conversation: its format is the template's turns."""
    if kind == "classification":
        user = spec.template_for(kind).format(labels=", ".join(labels), text="<text of the row>")
    elif kind == "chat":
        user = "<the row's conversation>"
    else:
        user = spec.template_for("instruction").format(prompt="<instruction of the row>")
    return render_prompt(tokenizer, user, spec.system_prompt) + "<answer>"


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad (input_ids, labels) pairs into tensors."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
