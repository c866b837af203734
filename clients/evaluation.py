"""Scoring an adapter on a local split: answer perplexity and label accuracy.

* perplexity: exp of the mean negative log-likelihood of the answer tokens.
* accuracy (classification silos): the label whose completion
  ``label + end-of-turn`` has the highest log-likelihood given the prompt —
  constrained decoding over the silo's label set, deterministic, and far
  cheaper than free generation on a CPU.

Only these aggregates leave the organization, never per-example outputs.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Sequence

import numpy as np

from clients.formatting import IGNORE_INDEX, EncodedExample, answer_suffix, collate
from clients.resident import ResidentModel


def _answer_logprobs(model, batch) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Sum of log p(answer token) per row, and count of answer tokens."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    mask = targets != IGNORE_INDEX
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(mask, picked, torch.zeros_like(picked))
    return np.stack([picked.sum(-1).numpy(), mask.sum(-1).numpy()], axis=1)


def evaluate_examples(
    resident: ResidentModel,
    examples: Sequence[EncodedExample],
    gold_labels: Sequence[str] | None = None,
    label_set: Sequence[str] = (),
    *,
    use_adapter: bool = True,
    batch_size: int = 16,
) -> dict[str, float]:
    """Metrics of the model as it stands (adapter loaded by the caller)."""
    import torch

    model = resident.model
    pad_id = resident.tokenizer.pad_token_id
    context = nullcontext() if use_adapter else model.disable_adapter()
    total_nll, total_tokens = 0.0, 0
    correct = 0
    with torch.no_grad(), context:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            scores = _answer_logprobs(model, collate([(e.input_ids, e.labels) for e in chunk], pad_id))
            total_nll -= float(scores[:, 0].sum())
            total_tokens += int(scores[:, 1].sum())
        if gold_labels is not None and label_set:
            correct = _count_correct(resident, examples, gold_labels, label_set, batch_size)
    metrics = {
        "num_examples": float(len(examples)),
        "loss": total_nll / max(total_tokens, 1),
    }
    metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    if gold_labels is not None and label_set:
        metrics["accuracy"] = correct / max(len(examples), 1)
    return metrics


def _count_correct(
    resident: ResidentModel,
    examples: Sequence[EncodedExample],
    gold_labels: Sequence[str],
    label_set: Sequence[str],
    batch_size: int,
) -> int:
    tokenizer = resident.tokenizer
    suffix = answer_suffix(tokenizer)
    candidates = [tokenizer(label + suffix, add_special_tokens=False).input_ids for label in label_set]
    rows: list[tuple[list[int], list[int]]] = []
    for example in examples:
        for ids in candidates:
            rows.append((example.prompt_ids + ids, [IGNORE_INDEX] * len(example.prompt_ids) + ids))
    scores = np.concatenate(
        [
            _answer_logprobs(resident.model, collate(rows[i : i + batch_size], tokenizer.pad_token_id))[:, 0]
            for i in range(0, len(rows), batch_size)
        ]
    ).reshape(len(examples), len(label_set))
    predicted = [label_set[j] for j in scores.argmax(axis=1)]
    return sum(p == g for p, g in zip(predicted, gold_labels))
