"""A localhost deployment: a coordinator and two agents as separate processes.

Each organization has its own silo file; the coordinator runs a SuperLink and
the ServerApp for 2 rounds; afterwards the exported specialist loads with
`PeftModel.from_pretrained` and its tensors equal the last checkpoint's.
Every process is started here and stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from clients.silo.corpora import load_bbc_news
from runtime.flower_processes import alive, free_port, stop_process_tree
from server.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow

SILOTUNE = str(Path(sys.executable).with_name("silotune"))


def write_silo(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows))
    return path


SETTINGS = {"model": "tiny-llama", "num-rounds": 2, "min-nodes": 2, "local-steps": 2, "max-length": 96,
            "eval-max-examples": 8, "round-timeout": 240, "node-wait-timeout": 120}


def deploy(root: Path, settings: dict, silos: list[Path], *, agent_args: tuple[str, ...] = ("--no-resident",),
           agent_env: Callable[[str], dict[str, str]] = lambda name: {}, timeout: float = 540) -> Path:
    """`silotune coordinator` and one `silotune agent start` per silo, as processes on
    127.0.0.1, until the coordinator's job ends; every process stopped by PID. Returns the run dir.
    ``agent_args`` and ``agent_env(name)`` (extra variables) shape the agents (benchmarks/deployment.py)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    run_dir = root / "run"
    coordinator_cmd = [SILOTUNE, "coordinator", "--insecure", "--state-dir", str(root / "coord"),
                       "--port", str(port), "--timeout", str(timeout - 40)]
    for key, value in {**settings, "run-dir": str(run_dir)}.items():
        coordinator_cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # each agent starts its own Ray
    names = [silo.stem for silo in silos]
    logs = {name: open(root / f"{name}.log", "w") for name in ("coordinator", *names)}
    processes: dict[str, subprocess.Popen] = {}
    try:
        processes["coordinator"] = subprocess.Popen(coordinator_cmd, stdout=logs["coordinator"],
                                                    stderr=subprocess.STDOUT, env=env, cwd=root)
        for silo in silos:
            processes[silo.stem] = subprocess.Popen(
                [SILOTUNE, "agent", "start", *agent_args, "--insecure", "--coordinator", f"127.0.0.1:{port}",
                 "--data", str(silo), "--name", silo.stem, "--state-dir", str(root / silo.stem)],
                stdout=logs[silo.stem], stderr=subprocess.STDOUT, env={**env, **agent_env(silo.stem)}, cwd=root)
        code = processes["coordinator"].wait(timeout=timeout)
        assert code == 0, (root / "coordinator.log").read_text()[-4000:]
        for name in names:  # an agent leaves on SIGTERM and stops its SuperNode
            processes[name].send_signal(signal.SIGTERM)
            assert processes[name].wait(timeout=60) == 0, (root / f"{name}.log").read_text()[-3000:]
    finally:
        leftovers = []
        for process in processes.values():
            if process.poll() is None:
                leftovers += stop_process_tree(process.pid, grace=5)
        for handle in logs.values():
            handle.close()
    assert leftovers == [] and alive([p.pid for p in processes.values()]) == []
    shutil.rmtree(root / "coord", ignore_errors=True)
    return run_dir


def test_coordinator_and_two_agents_two_rounds(tmp_path: Path) -> None:
    corpus = load_bbc_news()
    silos = [write_silo(tmp_path / "bank-a.jsonl", corpus[0:40]), write_silo(tmp_path / "bank-b.jsonl", corpus[-40:])]
    run_dir = deploy(tmp_path, {**SETTINGS, "job-id": "deploy-test"}, silos)

    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["organizations"]) == ["bank-a", "bank-b"]
    assert [h["round"] for h in report["history"]] == [0, 1, 2]
    # round 0 waited for the agents: the base model was scored at both organizations
    assert sorted(report["history"][0]["eval"]) == ["bank-a", "bank-b"]
    # the coordinator's console showed the rounds while they ran, before the final table
    console = (tmp_path / "coordinator.log").read_text()
    table = console.index("specialist:")
    for line in ("round 1: 2 organization(s) sampled", "round 2 done"):
        assert -1 < console.find(line) < table, console[-3000:]
    assert all(sorted(h["accepted"]) == ["bank-a", "bank-b"] for h in report["history"][1:])

    from peft import PeftModel, get_peft_model_state_dict

    from runtime.base_model import load_model

    last = CheckpointStore(run_dir / "checkpoints").latest()
    assert last is not None and last.round == 2
    model = PeftModel.from_pretrained(load_model("tiny-llama"), run_dir / "specialist")
    loaded = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert sorted(loaded) == sorted(last.adapter)
    for name, value in last.adapter.items():
        assert np.array_equal(loaded[name].numpy(), value), name
    # the raw silo text never reached the coordinator's side
    assert json.loads((run_dir / "specialist" / "provenance.json").read_text())["secure_aggregation"] is False
    for path in (run_dir / "report.json", run_dir / "specialist" / "provenance.json"):
        text = path.read_text()
        assert corpus[0][0][:60] not in text and corpus[-1][0][:60] not in text
    # the ServerApp wrote the rounds' events; the coordinator printed them as per-round tables
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    finished = [e["summary"] for e in events if e["event"] == "round_finished"]
    assert [s["round"] for s in finished] == [h["round"] for h in report["history"]]
    assert [s["eval"] for s in finished] == [h["eval"] for h in report["history"]]
    assert sorted(e["org"] for e in events if e["event"] == "reply" and e["accepted"]) == ["bank-a", "bank-a",
                                                                                         "bank-b", "bank-b"]
    round_1 = console.index("round 1 done —")
    rows = console[round_1:console.index("round 2: 2 organization(s) sampled", round_1)].splitlines()
    assert any("bank-a" in row for row in rows) and any("bank-b" in row for row in rows), console[-3000:]
    assert round_1 < table


def test_secure_aggregation_across_processes_equals_the_plain_deployment(tmp_path: Path) -> None:
    """The four secure-aggregation exchanges over Flower's gRPC transport (each agent's
    ClientApp a new process per message, its keys kept in the SuperNode's context.state):
    the round ends on the plain deployment's adapter, within the quantization error."""
    corpus = load_bbc_news()
    silos = [write_silo(tmp_path / f"org-{i}.jsonl", corpus[40 * i: 40 * (i + 1)]) for i in range(3)]
    settings = {**SETTINGS, "min-nodes": 3, "num-rounds": 1}
    plain = CheckpointStore(deploy(tmp_path / "plain", {**settings, "job-id": "plain"}, silos) / "checkpoints").latest()
    secure_run = deploy(tmp_path / "secure", {**settings, "job-id": "plain", "secure-aggregation": "true"}, silos)
    secure = CheckpointStore(secure_run / "checkpoints").latest()
    assert plain is not None and secure is not None and plain.round == secure.round == 1
    for h in secure.run_state["history"][1:]:
        assert sorted(h["accepted"]) == ["org-0", "org-1", "org-2"] and h["rejected"] == [], h
    moved = 0.0
    for name, value in plain.adapter.items():
        np.testing.assert_allclose(secure.adapter[name], value, rtol=0, atol=1e-5, err_msg=name)
        moved += float(np.abs(value).sum()) if "lora_B" in name else 0.0
    assert moved > 0, "training moved nothing: the comparison would be vacuous"
    provenance = json.loads((secure_run / "specialist" / "provenance.json").read_text())
    assert provenance["secure_aggregation"] is True
    assert "| secure aggregation | yes" in (secure_run / "specialist" / "README.md").read_text()
