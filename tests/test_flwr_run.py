"""`flwr run .` — the repository is a Flower App that Flower's own CLI runs.

Local simulation, 4 virtual organizations, tiny model. `flwr run` starts a
background SuperLink that outlives the run; the test finds it by the port it
was told to use and stops it (and its children) by PID.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from runtime.flower_processes import (
    alive,
    find_local_superlink_pid,
    flower_env,
    flower_executable,
    free_port,
    new_tag,
    render_flwr_config,
    stop_process_tree,
    tagged,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_flwr_run_local_simulation_with_four_organizations(tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    http_port = free_port()
    tag = new_tag()
    env = flower_env(home, tag=tag, extra={"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
                                           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())})
    run_dir = tmp_path / "run"

    def flwr(*args: str) -> dict:
        result = subprocess.run([flower_executable("flwr"), *args, "--format", "json"], env=env,
                                capture_output=True, text=True, timeout=300, check=True, cwd=tmp_path)
        return json.loads(result.stdout)

    pid = None
    try:
        run_config = {"model": "tiny-llama", "num-rounds": 2, "min-nodes": 4, "local-steps": 2,
                      "max-length": 96, "eval-max-examples": 8, "sim-max-records": 30,
                      "run-dir": str(run_dir), "job-id": "flwr-run-test"}
        submitted = flwr("run", str(ROOT), "local", "--federation-config", "num-supernodes=4",
                         "--run-config", render_flwr_config(run_config))
        assert submitted["success"], submitted
        pid = find_local_superlink_pid(http_port)
        assert pid is not None, "flwr run did not leave a SuperLink on the port it was given"
        status, deadline = "", time.monotonic() + 600
        while time.monotonic() < deadline:
            status = flwr("ls", "local", "--run-id", str(submitted["run-id"]))["runs"][0]["status"]
            if status.startswith("finished"):
                break
            time.sleep(2)
        assert status == "finished:completed", (home / "local-superlink" / "superlink.log").read_text()[-3000:]
    finally:
        pid = pid or find_local_superlink_pid(http_port)
        stopped = stop_process_tree(pid, grace=10, tag=tag) if pid else []
    assert alive(stopped) == [] and not tagged(tag)

    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["organizations"]) == [f"org-{i}" for i in range(4)]
    assert [h["round"] for h in report["history"]] == [0, 1, 2]
    assert all(len(h["accepted"]) == 4 for h in report["history"][1:])
    assert (run_dir / "specialist" / "adapter_model.safetensors").is_file()
