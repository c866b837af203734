"""The `silotune` command: export, eval and generate on the tiny model; errors without tracebacks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protos.adapter import LoraSpec, adapter_layout, init_adapter, read_adapter_folder
from runtime.base_model import model_config
from server.checkpoint import CheckpointStore
from simulations.cli.main import main

SILOTUNE = str(Path(sys.executable).with_name("silotune"))
SPEC = LoraSpec(rank=4, alpha=8.0)


def silotune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SILOTUNE, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with two checkpoints of the tiny model, B non-zero."""
    root = tmp_path_factory.mktemp("run")
    store = CheckpointStore(root / "checkpoints")
    layout = adapter_layout(model_config("tiny-llama"), SPEC)
    for server_round in (1, 2):
        adapter = init_adapter(layout, seed=server_round)
        rng = np.random.default_rng(server_round)
        for name in adapter:
            if "lora_B" in name:
                adapter[name] = rng.normal(0, 0.05, adapter[name].shape).astype(np.float32)
        store.save(server_round, adapter, SPEC, "tiny-llama",
                   {"job_id": "cli", "strategy": "fedavg", "fingerprint": "x",
                    "history": [{"round": server_round, "eval": {"org-a": {}, "org-b": {}}}]})
    return root


@pytest.fixture(scope="module")
def silo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("silo") / "silo.jsonl"
    rows = [{"text": f"match report {i}: the team won", "label": "sport"} for i in range(10)]
    rows += [{"text": f"quarterly earnings {i} rose", "label": "business"} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_export_a_chosen_round(run_dir: Path, tmp_path: Path) -> None:
    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "r1"), "--round", "1"]) == 0
    spec, base, tensors = read_adapter_folder(tmp_path / "r1")
    expected = CheckpointStore(run_dir / "checkpoints").load(1).adapter
    assert spec == SPEC and base == "tiny-llama"
    assert all(np.array_equal(tensors[k], v) for k, v in expected.items())
    provenance = json.loads((tmp_path / "r1" / "provenance.json").read_text())
    assert provenance["round"] == 1 and provenance["num_organizations"] == 2
    # a second export into the same non-empty folder is refused, by name
    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "r1")]) == 2


def test_eval_base_versus_adapter(run_dir: Path, silo_file: Path, tmp_path: Path) -> None:
    main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "spec")])
    base = silotune("eval", "--model", "tiny-llama", "--data", str(silo_file), "--split", "all")
    tuned = silotune("eval", "--adapter", str(tmp_path / "spec"), "--data", str(silo_file), "--split", "all")
    assert base.returncode == 0 and tuned.returncode == 0, base.stderr + tuned.stderr
    base_metrics, tuned_metrics = json.loads(base.stdout), json.loads(tuned.stdout)
    assert base_metrics["num_examples"] == 20 and "accuracy" in base_metrics
    assert tuned_metrics["loss"] != pytest.approx(base_metrics["loss"], rel=1e-4), "adapter not applied"


def test_generate_equals_plain_peft_generation(run_dir: Path, tmp_path: Path) -> None:
    """The command's answer is what transformers + PEFT produce from the exported folder."""
    import torch
    from peft import PeftModel

    from clients.formatting import render_prompt
    from runtime.base_model import load_model, load_tokenizer

    main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "spec")])
    result = silotune("generate", "--adapter", str(tmp_path / "spec"), "--prompt", "Topic?", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer("tiny-llama")
    model = PeftModel.from_pretrained(load_model("tiny-llama"), tmp_path / "spec")
    inputs = tokenizer(render_prompt(tokenizer, "Topic?"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert result.stdout.strip() == expected


def test_bad_silo_is_a_named_error_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nhow,so\n")
    result = silotune("eval", "--model", "tiny-llama", "--data", str(bad))
    assert result.returncode == 2
    assert "SiloMissingColumn" in result.stderr and "Traceback" not in result.stderr


def test_deployment_commands_require_explicit_insecure() -> None:
    result = silotune("agent", "start", "--coordinator", "127.0.0.1:1", "--data", "x.jsonl")
    assert result.returncode == 2 and "--insecure" in result.stderr


def test_agent_check_prints_every_rule_of_the_policy(tmp_path: Path, silo_file: Path) -> None:
    from dataclasses import fields

    from clients.policy import OrganizationPolicy

    policy = tmp_path / "policy.yaml"
    policy.write_text("min_batch_size: 8\nallowed_job_ids: ['claims-*']\nmax_epsilon_total: 10.0\n")
    result = silotune("agent", "check", "--policy", str(policy))
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for f in fields(OrganizationPolicy):
        assert f.name in text, f.name
    assert re.search(r"min_batch_size\s*│\s*8\s*│", result.stdout)
    assert re.search(r"max_epsilon_total\s*│\s*10\.0\s*│", result.stdout)
    assert re.search(r"min_secure_session\s*│\s*3\s*│", result.stdout)  # a default, shown too
    assert "rows" not in text  # no --data: no silo summary
    as_json = json.loads(silotune("agent", "check", "--policy", str(policy), "--json").stdout)["policy"]
    assert as_json["min_batch_size"] == 8 and as_json["allowed_job_ids"] == ["claims-*"]
    assert set(as_json) == {f.name for f in fields(OrganizationPolicy)}
    both = silotune("agent", "check", "--policy", str(policy), "--data", str(silo_file), "--model", "tiny-llama")
    assert both.returncode == 0, both.stderr
    assert "min_batch_size" in both.stdout and "train / test split" in both.stdout


def test_a_malformed_policy_is_a_named_error_with_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("min_batch_size: four\n")
    result = silotune("agent", "check", "--policy", str(bad))
    assert result.returncode == 2
    assert "PolicyError" in result.stderr and "min_batch_size" in result.stderr and "Traceback" not in result.stderr
    # agent start refuses it before any key, connection or process
    bad.write_text("min_batch_sise: 4\n")
    result = silotune("agent", "start", "--insecure", "--coordinator", "127.0.0.1:1", "--data", "x.jsonl",
                      "--policy", str(bad))
    assert result.returncode == 2
    assert "PolicyError" in result.stderr and "min_batch_sise" in result.stderr and "Traceback" not in result.stderr
