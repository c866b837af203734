"""The job's task spec: one prompt for every organization, named errors, chat turns, metrics."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from clients.formatting import IGNORE_INDEX, EncodedExample, encode_example
from clients.silo import SiloNoRows, SiloUnknownLabel, load_silo
from protos.job_settings import JobSettings
from protos.round_config import round_config
from protos.task_spec import TaskSpec, TaskSpecError, parse_labels

SILOTUNE = str(Path(sys.executable).with_name("silotune"))

# support tickets: a data set none of the built-in scenarios uses
TICKETS = {
    "billing": ["I was charged twice for March", "Invoice 4411 shows the wrong VAT number"],
    "outage": ["The dashboard has been down since 9am", "API returns 503 for every call"],
    "refund": ["Please refund my annual plan", "I want my money back for the broken order"],
    "account": ["How do I change the email on my account?", "Two-factor codes never arrive"],
}


def write_tickets(path: Path, labels: list[str]) -> Path:
    rows = [{"text": text, "label": label} for label in labels for text in TICKETS[label]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec(**settings: object) -> TaskSpec:
    return TaskSpec.from_config(JobSettings.from_run_config(settings))


def test_organizations_with_different_label_subsets_render_the_same_prompt(tmp_path: Path) -> None:
    a = write_tickets(tmp_path / "bank-a.jsonl", ["billing", "outage"])
    b = write_tickets(tmp_path / "bank-b.jsonl", ["refund", "account", "billing"])
    job = spec(task="classification", **{"task-labels": "outage,billing,refund,account"})

    def headers(path: Path, task: TaskSpec | None) -> set[str]:
        silo = load_silo(path, spec=task)
        return {e.prompt.replace(text, "<text>") for e in silo.examples
                for texts in TICKETS.values() for text in texts if text in e.prompt}

    # without the spec each file lists its own labels: two different prompts (the bug this fixes)
    assert headers(a, None) != headers(b, None)
    # with it: one prompt, the job's labels in the job's order
    assert headers(a, job) == headers(b, job) == {
        "Classify the text into one of these categories: outage, billing, refund, account.\n\nText: <text>\n\nCategory:"}
    assert load_silo(a, spec=job).labels == load_silo(b, spec=job).labels == ("outage", "billing", "refund", "account")


def test_a_label_outside_the_set_is_a_named_error_or_skipped_and_counted(tmp_path: Path) -> None:
    path = write_tickets(tmp_path / "org.jsonl", ["billing", "outage", "refund"])
    job = spec(task="classification", **{"task-labels": "billing,outage"})
    with pytest.raises(SiloUnknownLabel, match=r"2 row\(s\).*'refund' \(rows 5, 6\).*unknown-labels=skip"):
        load_silo(path, spec=job)
    silo = load_silo(path, spec=replace(job, unknown_labels="skip"))
    assert len(silo) == 4 and silo.skipped_unknown_labels == 2
    assert {e.label for e in silo.examples} == {"billing", "outage"}
    with pytest.raises(SiloNoRows, match="all 2 rows have a label outside"):
        load_silo(write_tickets(tmp_path / "only-refunds.jsonl", ["refund"]),
                  spec=replace(job, unknown_labels="skip"))


def test_the_template_and_system_prompt_shape_every_example(tmp_path: Path) -> None:
    from runtime.base_model import load_tokenizer

    path = write_tickets(tmp_path / "org.jsonl", ["billing", "outage"])
    job = spec(task="classification", **{"task-labels": "billing,outage",
                                          "prompt-template": "Ticket: {text}\nQueue ({labels})?",
                                          "system-prompt": "You route support tickets."})
    example = load_silo(path, spec=job).examples[0]
    assert example.prompt == "Ticket: I was charged twice for March\nQueue (billing, outage)?"
    tokenizer = load_tokenizer("tiny-llama")
    text = tokenizer.decode(encode_example(tokenizer, example.prompt, example.answer, 200,
                                           system_prompt=job.system_prompt).input_ids)
    assert text.startswith("<|im_start|>system\nYou route support tickets.<|im_end|>")
    assert "SmolLM" not in text  # the job's system message replaces the template's default one

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"instruction": "Reset my password", "response": "Use the link"}) + "\n")
    assert load_silo(qa, spec=spec(task="instruction", **{"prompt-template": "Customer: {prompt}"})) \
        .examples[0].prompt == "Customer: Reset my password"


@pytest.mark.parametrize("settings, message", [
    ({"task": "regression"}, "task='regression'"),
    ({"metric": "bleu"}, "metric='bleu'"),
    ({"task-labels": "a,b,a"}, "distinct"),
    ({"task-labels": "a,,b"}, "not blank"),
    ({"task": "instruction", "task-labels": "a,b"}, "for classification"),
    ({"task": "chat", "metric": "accuracy"}, "needs a classification task"),
    ({"task": "classification", "prompt-template": "Label it."}, r"must contain \{text\}"),
    ({"task": "classification", "prompt-template": "{text} {customer}"}, "uses \\['customer'\\]"),
    ({"task": "classification", "prompt-template": "{text"}, "not a valid template"),
    ({"task": "chat", "prompt-template": "{prompt}"}, "chat rows are used as they are"),
    ({"unknown-labels": "drop"}, "error or skip"),
    ({"task-labels": "[1, true]"}, "JSON array of strings"),
])
def test_a_bad_task_spec_names_the_setting(settings: dict, message: str) -> None:
    with pytest.raises(TaskSpecError, match=message):
        spec(**settings)


def test_labels_parse_from_commas_or_json_and_the_fingerprint_follows_every_field() -> None:
    assert parse_labels(" a, b ,c") == ("a", "b", "c")
    assert parse_labels('["net, gross", "other", 3]') == ("net, gross", "other", "3")
    base = spec(task="classification", **{"task-labels": "a,b"})
    assert base.fingerprint() == spec(task="classification", **{"task-labels": "a, b"}).fingerprint()
    for changed in (replace(base, labels=("b", "a")), replace(base, system_prompt="x"),
                    replace(base, max_length=161), replace(base, metric="macro-f1"),
                    replace(base, unknown_labels="skip")):
        assert changed.fingerprint() != base.fingerprint()


def test_the_spec_travels_in_every_round_config() -> None:
    settings = JobSettings.from_run_config({"task": "classification", "task-labels": '["x", "y"]',
                                            "system-prompt": "S", "metric": "macro-f1"})
    cfg = round_config(settings, 3)
    restored = type(cfg).from_record(cfg.to_record())
    assert TaskSpec.from_config(restored) == TaskSpec.from_config(settings)
    assert TaskSpec.from_config(restored).labels == ("x", "y")


def test_a_deployed_classification_job_must_name_its_labels(caplog: pytest.LogCaptureFixture) -> None:
    from clients.local_data import task_spec
    from protos.round_config import simulation_settings

    explicit = round_config(JobSettings.from_run_config({"task": "classification"}), 1)
    with pytest.raises(TaskSpecError, match="declares no task-labels"):
        task_spec(explicit, None)
    # a simulation's virtual organizations share the corpus-wide set instead
    assert task_spec(explicit, simulation_settings(JobSettings())).kind == "classification"
    with caplog.at_level(logging.WARNING, logger="silotune.client"):
        task_spec(round_config(JobSettings(), 1), None)
    assert "declares no task and no task-labels" in caplog.text


def test_a_conversation_learns_every_assistant_turn_and_is_scored_on_its_last() -> None:
    from runtime.base_model import load_tokenizer

    tokenizer = load_tokenizer("tiny-llama")
    turns = (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"),
             ("assistant", "Goodbye!"))
    encoded = encode_example(tokenizer, "flattened", "Goodbye!", 200, messages=turns)

    def learned(labels: list[int]) -> str:
        return tokenizer.decode([i for i, label in zip(encoded.input_ids, labels) if label != IGNORE_INDEX])

    assert tokenizer.decode(encoded.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nGoodbye!<|im_end|>")
    assert learned(encoded.labels) == "Hello!<|im_end|>\nGoodbye!<|im_end|>"   # both answers, no user text
    assert learned(encoded.answer_labels) == "Goodbye!<|im_end|>"              # evaluation: the last one
    # cut to fit: ids and labels are cut together, and still agree token for token
    short = encode_example(tokenizer, "flattened", "Goodbye!", 24, messages=turns)
    assert short.truncated and len(short.input_ids) == len(short.labels) <= 24
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(short.input_ids, short.labels))


def test_a_messages_file_under_a_chat_task_keeps_its_turns(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "My card was declined"}, {"role": "assistant", "content": "Which card?"},
        {"role": "user", "content": "The Visa"}, {"role": "assistant", "content": "It expired in May."}]}) + "\n")
    silo = load_silo(path, spec=spec(task="chat"))
    assert silo.task == "chat" and silo.examples[0].messages[-1] == ("assistant", "It expired in May.")
    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({"instruction": "q", "response": "a"}) + "\n")
    with pytest.raises(ValueError, match="task 'chat' needs the columns of one of its layouts: messages"):
        load_silo(flat, spec=spec(task="chat"))


def test_exact_match_is_what_greedy_decoding_reproduces() -> None:
    """The teacher-forced exact match equals generating greedily: answers the model itself
    generated score 1, the same answers with one token changed score 0."""
    import torch

    from clients.evaluation import evaluate_examples
    from clients.resident import get_resident
    from protos.adapter import LoraSpec

    resident = get_resident("tiny-llama", LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    tokenizer = resident.tokenizer
    examples, wrong = [], []
    for prompt in ("Route this ticket", "Refund please", "Server down"):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        with torch.no_grad(), resident.model.disable_adapter():
            out = resident.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id)
        generated = out[0, len(ids):].tolist()
        examples.append(EncodedExample(ids, generated, False))
        wrong.append(EncodedExample(ids, generated[:-1] + [(generated[-1] + 1) % len(tokenizer)], False))
    resident.load_adapter({})  # nothing loaded: the adapter is LoRA's zero-B initial state
    with resident.lock:
        assert evaluate_examples(resident, examples, use_adapter=False)["exact_match"] == 1.0
        assert evaluate_examples(resident, wrong, use_adapter=False)["exact_match"] == 0.0
        assert evaluate_examples(resident, examples[:2] + wrong[2:], use_adapter=False)["exact_match"] == \
            pytest.approx(2 / 3)


def test_macro_f1_matches_its_definition() -> None:
    from clients.evaluation import macro_f1

    gold = ["a", "a", "b", "c", "c", "c"]
    predicted = ["a", "b", "b", "c", "a", "c"]
    # a: tp1 fp1 fn1 -> 0.5; b: tp1 fp1 fn0 -> 2/3; c: tp2 fp0 fn1 -> 0.8; d occurs nowhere: not counted
    assert macro_f1(predicted, gold, ["a", "b", "c", "d"]) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert macro_f1(gold, gold, ["a", "b", "c"]) == 1.0


def test_agent_check_shows_how_a_file_maps_onto_the_job(tmp_path: Path) -> None:
    data = write_tickets(tmp_path / "org.jsonl", ["billing", "outage", "refund"])
    job = tmp_path / "job.yaml"
    job.write_text("name: tickets\nnum-organizations: 3\nrun-config:\n  model: tiny-llama\n"
                   "  task: classification\n  task-labels: billing,outage,account\n"
                   "  system-prompt: You route support tickets.\n")
    result = subprocess.run([SILOTUNE, "agent", "check", "--data", str(data), "--job", str(job)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr  # the job would be refused
    out = " ".join(result.stdout.split())
    assert "'refund' (not in the job) │ 2 rows: error" in out and "'account' (the job's) │ 0 rows here" in out
    assert "You route support tickets." in out and "categories: billing, outage, account." in out
    assert "I was charged twice" not in result.stdout  # the prompt's format, never a record
    job.write_text(job.read_text() + "  unknown-labels: skip\n")
    as_json = subprocess.run([SILOTUNE, "agent", "check", "--data", str(data), "--job", str(job), "--json"],
                             capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["labels_not_in_job"] == {"refund": 2} and summary["labels_not_in_file"] == ["account"]
    assert summary["task_fingerprint"] == spec(
        model="tiny-llama", task="classification", **{"task-labels": "billing,outage,account",
                                                      "system-prompt": "You route support tickets.",
                                                      "unknown-labels": "skip"}).fingerprint()
    bad = tmp_path / "bad.yaml"
    bad.write_text("run-config:\n  task-lables: a,b\n")
    failed = subprocess.run([SILOTUNE, "agent", "check", "--data", str(data), "--job", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "task-lables" in failed.stderr + failed.stdout


def test_the_coordinator_refuses_a_bad_task_spec_before_any_round() -> None:
    from server.job_config import JobConfig, JobConfigError

    with pytest.raises(JobConfigError, match=r"task settings: prompt-template must contain \{text\}"):
        JobConfig.from_run_config({"task": "classification", "task-labels": "a,b", "prompt-template": "x"})
    cfg = JobConfig.from_run_config({"task": "classification", "task-labels": "a,b", "metric": "macro-f1"})
    assert cfg.task_spec.labels == ("a", "b") and cfg.task_spec.headline_metric("classification") == "macro-f1"


@pytest.mark.parametrize("metric, value", [("macro_f1", 1.5), ("exact_match", -0.1), ("local_accuracy", 2.0),
                                           ("local_perplexity", 0.5), ("local_loss", -1.0)])
def test_the_coordinator_bounds_the_new_metrics(metric: str, value: float) -> None:
    from server.validation import UpdateRejected, check_metrics

    with pytest.raises(UpdateRejected, match=metric):
        check_metrics({metric: value})
    assert check_metrics({metric: 1.0}) == {metric: 1.0}


def test_overall_macro_f1_and_exact_match_are_example_weighted() -> None:
    from server.job import overall_metrics

    overall = overall_metrics({"a": {"num_examples": 10, "loss": 1.0, "macro_f1": 0.5, "exact_match": 0.2},
                               "b": {"num_examples": 30, "loss": 1.0, "macro_f1": 0.9, "exact_match": 0.6}})
    assert overall["macro_f1"] == pytest.approx(0.8) and overall["exact_match"] == pytest.approx(0.5)


def test_a_job_file_without_simulation_keys_is_a_coordinator_scenario(tmp_path: Path) -> None:
    from simulations.cli.simulate_command import scenario_run_config
    from simulations.scenario import ScenarioError, load_scenario

    job = tmp_path / "job.yaml"
    job.write_text("run-config:\n  task: classification\n  task-labels: billing,outage\n")
    assert scenario_run_config(str(job), ["metric=macro-f1"]) == {
        "task": "classification", "task-labels": "billing,outage", "metric": "macro-f1"}
    with pytest.raises(ScenarioError, match="num-organizations"):
        load_scenario(str(job))  # a simulation needs to know how many


def test_the_local_only_metrics_are_pooled_overall_too() -> None:
    import math

    from server.job import overall_metrics

    overall = overall_metrics({"a": {"num_examples": 10, "loss": 1.0, "local_loss": 2.0, "local_accuracy": 0.2},
                               "b": {"num_examples": 30, "loss": 1.0, "local_loss": 1.0, "local_accuracy": 0.6}})
    assert overall["local_accuracy"] == pytest.approx(0.5) and overall["local_loss"] == pytest.approx(1.25)
    assert overall["local_perplexity"] == pytest.approx(math.exp(1.25))


def test_a_template_or_label_list_on_the_command_line_is_taken_as_typed() -> None:
    from simulations.scenario import parse_overrides

    template = "Topics: {labels}.\n\nQuestion: {text}\n\nTopic:"
    parsed = parse_overrides([f"prompt-template={template}", 'task-labels=["a, b", "c"]', "system-prompt=Note: be brief",
                              "learning-rate=1e-3", "local-baseline=true", "num-rounds=3", "job-id=null"])
    assert parsed == {"prompt-template": template, "task-labels": '["a, b", "c"]', "system-prompt": "Note: be brief",
                      "learning-rate": 0.001, "local-baseline": True, "num-rounds": 3, "job-id": "null"}
