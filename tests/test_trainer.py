"""Local training and evaluation on the tiny model, in process (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from clients.evaluation import _score_whole_labels, evaluate_examples
from clients.formatting import IGNORE_INDEX, encode_example
from clients.resident import get_resident
from clients.silo import classification_silo
from clients.trainer import TrainSettings, batch_order, train_adapter
from protos.adapter import LoraSpec

SPEC = LoraSpec(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def resident():  # type: ignore[no-untyped-def]
    return get_resident("tiny-llama", SPEC)


@pytest.fixture(scope="module")
def silo():  # type: ignore[no-untyped-def]
    rows = [(f"report number {i} about {topic} matters", topic)
            for i in range(12) for topic in ("markets", "football", "elections")]
    return classification_silo(rows, source="test")


def test_loss_is_on_answer_tokens_only(resident) -> None:  # type: ignore[no-untyped-def]
    example = encode_example(resident.tokenizer, "What is the topic?", "football", max_length=96)
    labels = example.labels
    assert labels[: len(example.prompt_ids)] == [IGNORE_INDEX] * len(example.prompt_ids)
    assert labels[len(example.prompt_ids):] == example.answer_ids
    assert resident.tokenizer.decode(example.answer_ids).startswith("football")


def test_truncation_keeps_the_prompt_tail_and_the_answer(resident) -> None:  # type: ignore[no-untyped-def]
    long_prompt = "word " * 400 + "FINAL QUESTION"
    full = encode_example(resident.tokenizer, long_prompt, "yes", max_length=4096)
    cut = encode_example(resident.tokenizer, long_prompt, "yes", max_length=64)
    assert cut.truncated and not full.truncated
    assert len(cut.input_ids) <= 64
    assert cut.answer_ids == full.answer_ids
    assert cut.prompt_ids[-10:] == full.prompt_ids[-10:]   # the question's end and the assistant marker
    assert cut.prompt_ids[:10] == full.prompt_ids[:10]     # the instruction's start


def test_batch_order_is_seeded_and_covers_the_data() -> None:
    first = batch_order(10, steps=5, batch_size=4, seed=3)
    assert first == batch_order(10, steps=5, batch_size=4, seed=3)
    assert first != batch_order(10, steps=5, batch_size=4, seed=4)
    assert set(sum(first[:2], [])) | set(first[2][:2]) == set(range(10))


def test_training_lowers_the_answer_loss_and_only_moves_lora(resident, silo) -> None:  # type: ignore[no-untyped-def]
    examples = [encode_example(resident.tokenizer, e.prompt, e.answer, 96) for e in silo.examples]
    start = resident.adapter()
    base_before = {k: v.clone() for k, v in resident.model.get_base_model().state_dict().items() if "lora" not in k}
    before = evaluate_examples(resident, examples)["loss"]
    trained, metrics = train_adapter(resident, start, examples,
                                     TrainSettings(local_steps=30, batch_size=8, learning_rate=3e-2, seed=0))
    resident.load_adapter(trained)
    after = evaluate_examples(resident, examples)["loss"]
    assert after < before - 0.3, (before, after)
    assert metrics["train_steps"] == 30 and metrics["train_tokens"] > 0
    assert any(not np.array_equal(trained[k], start[k]) for k in start)
    for name, value in resident.model.get_base_model().state_dict().items():
        if "lora" not in name:
            assert value.equal(base_before[name]), f"base weight {name} changed"


def test_same_seed_same_adapter(resident, silo) -> None:  # type: ignore[no-untyped-def]
    examples = [encode_example(resident.tokenizer, e.prompt, e.answer, 96) for e in silo.examples]
    start = resident.adapter()
    settings = TrainSettings(local_steps=3, batch_size=4, learning_rate=1e-3, seed=7)
    first, _ = train_adapter(resident, start, examples, settings)
    second, _ = train_adapter(resident, start, examples, settings)
    for name in first:
        assert np.array_equal(first[name], second[name])


def test_fast_accuracy_equals_whole_label_scoring(resident, silo) -> None:  # type: ignore[no-untyped-def]
    """The single-pass (first token) prediction must be the constrained-decoding choice."""
    examples = [encode_example(resident.tokenizer, e.prompt, e.answer, 96) for e in silo.examples]
    gold = [e.label for e in silo.examples]
    metrics = evaluate_examples(resident, examples, gold, silo.labels)
    tokenizer = resident.tokenizer
    candidates = [tokenizer(label + tokenizer.eos_token, add_special_tokens=False).input_ids for label in silo.labels]
    assert len({ids[0] for ids in candidates}) == len(candidates), "test needs distinct first tokens"
    # Score only the first label token in the slow path: it must agree exactly.
    first_only = [[ids[0]] for ids in candidates]
    slow = _score_whole_labels(resident, examples, silo.labels, first_only, batch_size=8)
    slow_accuracy = sum(p == g for p, g in zip(slow, gold)) / len(gold)
    assert metrics["accuracy"] == pytest.approx(slow_accuracy)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["perplexity"] > 1.0


def test_disabled_adapter_scores_the_base_model(resident, silo) -> None:  # type: ignore[no-untyped-def]
    examples = [encode_example(resident.tokenizer, e.prompt, e.answer, 96) for e in silo.examples[:6]]
    adapter = resident.adapter()
    shifted = {k: v + (0.5 if "lora_B" in k else 0.0) for k, v in adapter.items()}
    resident.load_adapter(shifted)
    with_adapter = evaluate_examples(resident, examples)["loss"]
    without = evaluate_examples(resident, examples, use_adapter=False)["loss"]
    resident.load_adapter({k: v * (0 if "lora_B" in k else 1) for k, v in adapter.items()})
    zero_b = evaluate_examples(resident, examples)["loss"]
    assert without == pytest.approx(zero_b, rel=1e-5)
    assert with_adapter != pytest.approx(without, rel=1e-3)


def test_frozen_factor_does_not_move(resident, silo) -> None:  # type: ignore[no-untyped-def]
    """FFA-LoRA: A stays at its initial value; only B trains."""
    examples = [encode_example(resident.tokenizer, e.prompt, e.answer, 96) for e in silo.examples]
    start = resident.adapter()
    trained, _ = train_adapter(resident, start, examples, TrainSettings(
        local_steps=3, batch_size=4, learning_rate=1e-2, seed=1, trained_factors=("lora_B",)))
    for name in start:
        moved = not np.array_equal(trained[name], start[name])
        assert moved == ("lora_B" in name), name


def test_proximal_term_keeps_the_update_near_the_global(resident, silo) -> None:  # type: ignore[no-untyped-def]
    examples = [encode_example(resident.tokenizer, e.prompt, e.answer, 96) for e in silo.examples]
    start = resident.adapter()

    def distance(mu: float) -> float:
        trained, _ = train_adapter(resident, start, examples, TrainSettings(
            local_steps=10, batch_size=4, learning_rate=2e-2, seed=2, proximal_mu=mu))
        return float(sum(np.sum((trained[k] - start[k]) ** 2) for k in start))

    assert distance(50.0) < 0.8 * distance(0.0)
