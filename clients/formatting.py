"""Examples → token ids: the chat template, answer-only labels, truncation.

The loss is on the answer tokens only (labels are -100 elsewhere): the model
learns to answer, not to reproduce the organization's documents.

Over-long examples are cut in the *middle* of the prompt: the head carries
the instruction, the tail carries the question's end ("...Category:") and the
template's assistant marker, both of which the answer depends on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
_PROMPT_TAIL_TOKENS = 24


@dataclass(frozen=True)
class EncodedExample:
    prompt_ids: list[int]
    answer_ids: list[int]
    truncated: bool

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + self.answer_ids


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model sees it, ending where the answer starts."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def answer_suffix(tokenizer: Any) -> str:
    """What ends an answer: the template's end-of-turn token."""
    return tokenizer.eos_token or ""


def encode_example(tokenizer: Any, prompt: str, answer: str, max_length: int) -> EncodedExample:
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer + answer_suffix(tokenizer), add_special_tokens=False).input_ids
    truncated = False
    # the answer may use at most half of the budget; the prompt gets the rest
    if len(answer_ids) > max_length // 2 and len(prompt_ids) + len(answer_ids) > max_length:
        answer_ids = answer_ids[: max(max_length // 2, max_length - len(prompt_ids))]
        truncated = True
    budget = max_length - len(answer_ids)
    if len(prompt_ids) > budget:
        tail = min(_PROMPT_TAIL_TOKENS, budget // 2)
        prompt_ids = prompt_ids[: budget - tail] + prompt_ids[len(prompt_ids) - tail :]
        truncated = True
    return EncodedExample(prompt_ids, answer_ids, truncated)


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
