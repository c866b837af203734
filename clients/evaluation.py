"""Scoring an adapter on a local split: answer perplexity, exact match, label accuracy and macro-F1.

* perplexity: exp of the mean negative log-likelihood of the answer tokens
  (a conversation's last answer).
* exact match: the share of answers greedy decoding would reproduce token for
  token (end-of-turn included). Greedy decoding yields the gold answer exactly
  when, at every answer position, the gold token is the most likely one given
  the gold prefix — which the same teacher-forced pass already shows, so it
  needs no generation.
* accuracy (classification silos): constrained greedy decoding over the
  silo's label set — the label the model would start to write when only
  labels are allowed. When every label begins with a different token (the
  usual case) that is decided by the very forward pass that gives the
  perplexity, so accuracy costs nothing extra; otherwise each label's whole
  completion is scored.
* macro-F1 (classification): the mean F1 over the labels that occur in the
  gold answers or the predictions (scikit-learn's ``f1_score(average="macro")``
  without ``labels``), so a small held-out split is not scored on labels it
  never holds.

Speed matters on a CPU: the vocabulary projection (49k × 576 for SmolLM2) is
applied only at the positions that predict answer tokens, not at every
prompt position. Only these aggregates leave the organization, never
per-example outputs.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Sequence

import numpy as np

from clients.formatting import IGNORE_INDEX, EncodedExample, answer_suffix, collate
from clients.resident import ResidentModel

#: every metric an evaluation reports (``evaluate_examples``); an organization's
#: policy (clients/policy.py, ``allowed_metrics``) chooses which of them leave
EVAL_METRICS = ("num_examples", "loss", "perplexity", "exact_match", "accuracy", "macro_f1")


def _answer_scores(model: Any, batch: dict[str, Any], first_token_ids: list[int] | None) -> dict[str, Any]:
    """Per row: Σ log p(answer tokens), answer token count, and (optionally)
    log p of each candidate first token at the first answer position."""
    import torch

    causal_lm = model.get_base_model()
    device = next(causal_lm.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    rows, cols = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
    logits = causal_lm.lm_head(hidden[rows, cols]).float()          # only answer-predicting positions
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, targets[rows, cols].unsqueeze(-1)).squeeze(-1)
    n_rows = batch["input_ids"].shape[0]
    total = torch.zeros(n_rows, device=device).index_add_(0, rows, picked)
    count = torch.zeros(n_rows, device=device).index_add_(0, rows, torch.ones_like(picked))
    missed = (logprobs.argmax(-1) != targets[rows, cols]).float()
    wrong = torch.zeros(n_rows, device=device).index_add_(0, rows, missed)
    out: dict[str, Any] = {"logprob": total.cpu().numpy(), "tokens": count.cpu().numpy(),
                           "exact": (wrong == 0).cpu().numpy()}
    if first_token_ids is not None:
        # nonzero() is row-major, so each row's answer positions are contiguous:
        # the first one of a row sits where the previous rows' counts end
        _, per_row = torch.unique_consecutive(rows, return_counts=True)
        first = torch.cumsum(per_row, 0) - per_row
        out["first"] = logprobs[first][:, first_token_ids].cpu().numpy()
    return out


def evaluate_examples(
    resident: ResidentModel,
    examples: Sequence[EncodedExample],
    gold_labels: Sequence[str] | None = None,
    label_set: Sequence[str] = (),
    *,
    use_adapter: bool = True,
    batch_size: int = 8,
) -> dict[str, float]:
    """Metrics of the model as it stands (the caller has loaded the adapter)."""
    import torch

    model = resident.model
    pad_id = resident.tokenizer.pad_token_id
    classify = gold_labels is not None and len(label_set) > 0
    candidates = _label_token_ids(resident.tokenizer, label_set) if classify else []
    first_ids = [ids[0] for ids in candidates]
    single_pass = classify and len(set(first_ids)) == len(first_ids)
    total_nll, total_tokens, exact = 0.0, 0, 0
    predicted: list[str] = []
    context = nullcontext() if use_adapter else model.disable_adapter()
    with torch.no_grad(), context:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            scores = _answer_scores(model, collate([(e.input_ids, e.answer_labels) for e in chunk], pad_id),
                                    first_ids if single_pass else None)
            exact += int(scores["exact"].sum())
            total_nll -= float(scores["logprob"].sum())
            total_tokens += int(scores["tokens"].sum())
            if single_pass:
                predicted += [label_set[j] for j in scores["first"].argmax(axis=1)]
        if classify and not single_pass:
            predicted = _score_whole_labels(resident, examples, label_set, candidates, batch_size)
    metrics = {"num_examples": float(len(examples)), "loss": total_nll / max(total_tokens, 1)}
    metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    metrics["exact_match"] = exact / max(len(examples), 1)
    if classify:
        metrics["accuracy"] = sum(p == g for p, g in zip(predicted, gold_labels)) / max(len(examples), 1)  # type: ignore[arg-type]
        metrics["macro_f1"] = macro_f1(predicted, list(gold_labels), label_set)  # type: ignore[arg-type]
    return metrics


def macro_f1(predicted: Sequence[str], gold: Sequence[str], label_set: Sequence[str]) -> float:
    """Mean per-label F1 over the labels of ``label_set`` that occur in ``gold`` or ``predicted``."""
    scores = []
    for label in label_set:
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


def _label_token_ids(tokenizer: Any, label_set: Sequence[str]) -> list[list[int]]:
    suffix = answer_suffix(tokenizer)
    return [tokenizer(label + suffix, add_special_tokens=False).input_ids for label in label_set]


def _score_whole_labels(
    resident: ResidentModel,
    examples: Sequence[EncodedExample],
    label_set: Sequence[str],
    candidates: list[list[int]],
    batch_size: int,
) -> list[str]:
    """Fallback when labels share a first token: the most likely whole completion."""
    rows = [
        (e.prompt_ids + ids, [IGNORE_INDEX] * len(e.prompt_ids) + ids) for e in examples for ids in candidates
    ]
    pad_id = resident.tokenizer.pad_token_id
    scores = np.concatenate(
        [_answer_scores(resident.model, collate(rows[i : i + batch_size], pad_id), None)["logprob"]
         for i in range(0, len(rows), batch_size)]
    ).reshape(len(examples), len(label_set))
    return [label_set[j] for j in scores.argmax(axis=1)]
