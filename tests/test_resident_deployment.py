"""Three rounds, two agents: with the resident trainer the base model loads once.

One agent runs its resident trainer on its own Ray; the other runs without
(each ClientApp process loads the model). Every reply reports the serving
process and how many times it loaded a base model; the coordinator's history
shows the difference — counted, not assumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clients.silo.corpora import load_bbc_news
from runtime.flower_processes import alive, free_port, stop_process_tree

pytestmark = pytest.mark.slow

SILOTUNE = str(Path(sys.executable).with_name("silotune"))


def test_resident_trainer_loads_the_base_model_once_per_agent(tmp_path: Path) -> None:
    corpus = load_bbc_news()
    silos = {}
    for name, rows in (("resident-org", corpus[:30]), ("plain-org", corpus[-30:])):
        silos[name] = tmp_path / f"{name}.jsonl"
        silos[name].write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    port = free_port()
    run_dir = tmp_path / "run"
    settings = {"model": "tiny-llama", "job-id": "resident-test", "num-rounds": 3, "min-nodes": 2,
                "local-steps": 1, "max-length": 64, "eval-max-examples": 4, "round-timeout": 240,
                "node-wait-timeout": 180, "run-dir": str(run_dir)}
    command = [SILOTUNE, "coordinator", "--insecure", "--state-dir", str(tmp_path / "coord"),
               "--port", str(port), "--timeout", "600"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    processes: dict[str, subprocess.Popen] = {}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("coordinator", *silos)}
    try:
        processes["coordinator"] = subprocess.Popen(command, stdout=logs["coordinator"], stderr=subprocess.STDOUT,
                                                    env=env, cwd=tmp_path)
        for name, path in silos.items():
            agent = [SILOTUNE, "agent", "start", "--insecure", "--data", str(path), "--name", name,
                     "--coordinator", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / name)]
            if name == "plain-org":
                agent.append("--no-resident")
            processes[name] = subprocess.Popen(agent, stdout=logs[name], stderr=subprocess.STDOUT, env=env,
                                               cwd=Path(__file__).resolve().parent.parent)
        assert processes["coordinator"].wait(timeout=660) == 0, (tmp_path / "coordinator.log").read_text()[-4000:]
        for name in silos:
            processes[name].send_signal(signal.SIGTERM)
            assert processes[name].wait(timeout=90) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        leftovers = [pid for p in processes.values() if p.poll() is None for pid in stop_process_tree(p.pid, 5)]
        for handle in logs.values():
            handle.close()
    assert leftovers == [] and alive([p.pid for p in processes.values()]) == []

    history = json.loads((run_dir / "report.json").read_text())["history"]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    resident = [h["eval"]["resident-org"] for h in history]
    plain = [h["eval"]["plain-org"] for h in history]
    assert len({m["resident_pid"] for m in resident}) == 1, "the resident trainer was not reused"
    assert all(m["base_model_loads"] == 1 for m in resident), "the base model was loaded more than once"
    assert len({m["resident_pid"] for m in plain}) == len(plain), "without it, every message is a new process"
