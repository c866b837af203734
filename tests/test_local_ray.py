"""A Ray that silotune starts listens on the loopback interface only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray")

# Start Ray the way the agent and the simulation runner do, in a fresh interpreter (Ray
# reads its switch at import), and list every listening socket of the processes it started.
SCRIPT = textwrap.dedent("""
    import json, sys
    import psutil
    import ray  # imported first on purpose: the switch must also work after the import
    from clients.local_ray import keep_ray_on_loopback

    keep_ray_on_loopback()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ray.get(ray.remote(lambda: 1).remote())  # a worker process listens too
        me = psutil.Process()
        ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
        listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in ours]
        print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listening": listening}))
    finally:
        ray.shutdown()
""")

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_ray_started_by_silotune_binds_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["gcs"].startswith("127.0.0.1:"), found
    assert found["listening"], "no listening socket found: the check would be vacuous"
    assert set(found["listening"]) <= LOOPBACK, found["listening"]
