"""Keep a Ray that silotune starts on this machine on the loopback interface.

On Linux, Ray advertises the machine's routable address as the node IP — even
for ``ray.init()`` with no cluster, and even when asked for
``--node-ip-address 127.0.0.1`` (``services.resolve_ip_for_localhost`` swaps the
loopback address back for the routable one) — and its GCS, raylet and workers
then listen on every interface. A Ray that silotune starts for itself (the
Simulation Engine's, or an agent's own when no ``RAY_ADDRESS`` is given) serves
only processes of this machine, so it has no business being reachable from
the network: anyone who can reach the GCS can run code in the silo.

Ray's own switch for this is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its
default on Windows and macOS): the node IP becomes 127.0.0.1 and every Ray
server binds to loopback only. It is read into ``ray_constants`` when Ray is
imported, so :func:`keep_ray_on_loopback` sets the variable (inherited by the
raylet, the GCS and every worker) and the already-imported constant.

An organization whose silo spans several machines starts its Ray cluster
itself (``ray start --head`` on an interface of its choosing) and hands the
agent ``RAY_ADDRESS``; then nothing here applies.
"""

from __future__ import annotations

import os
import sys

LOCAL_ONLY_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_ray_on_loopback() -> None:
    """Make the next Ray started from this process bind to 127.0.0.1 only."""
    os.environ[LOCAL_ONLY_VAR] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
