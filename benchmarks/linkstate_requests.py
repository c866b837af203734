"""What one Fleet object request costs the SuperLink's database, Flower as is against paced.

    python benchmarks/linkstate_requests.py [--requests 200] [--threads 1,3,6]

A Fleet PullObject in Flower 1.41 (`flwr/superlink/servicer/fleet/fleet_handlers.py`
`pull_object`) does, on the SuperLink's SQL LinkState: `check_abort` (the run's status, which
first cleans up expired task tokens), `get_object`, `store_traffic`. This script runs exactly
those three calls on Flower's own SqlLinkState over a file database in a temporary directory,
from 1, 3 and 6 threads at once (closed loop: each thread starts its next request when its last
one ends), first with Flower as is, then, in the same process on a fresh database, with
server/linkstate_pacing.py's two changes applied. Prints per-request latency (median, p90, max)
and throughput, and the ratios. No HTTP: the SuperLink's web framework and the request's other
hops are not in these figures (benchmarks/deployment.py --trace has the whole path).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flwr.common.constant import Status  # noqa: E402
from flwr.server.superlink.utils import check_abort  # noqa: E402
from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories  # noqa: E402

from server import linkstate_pacing  # noqa: E402

ABORT_ON = [Status.PENDING, Status.STARTING, Status.FINISHED]  # as Flower's pull_object passes them


def pull_object_requests(database: Path, threads: int, requests: int) -> dict[str, float]:
    """`requests` pull-object database sequences per thread; latencies in ms, throughput per s."""
    _, factory = get_objectstore_linkstate_factories(str(database), get_federation_manager(is_simulation=False))
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, "default", None, None, "serverapp")

    def one() -> float:
        began = time.perf_counter()
        check_abort(run_id, ABORT_ON, state)
        state.get_object(run_id, "0" * 64)
        state.store_traffic(run_id, bytes_sent=1000, bytes_recv=0)
        return time.perf_counter() - began

    for _ in range(20):  # warm-up: statement caches, the pool's first connections
        one()
    latencies: list[float] = []
    start = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for _ in range(requests):
            latencies.append(one())

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - began
    latencies.sort()
    return {"median": statistics.median(latencies) * 1e3, "p90": latencies[int(0.9 * len(latencies))] * 1e3,
            "max": latencies[-1] * 1e3, "per_second": len(latencies) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per thread")
    parser.add_argument("--threads", default="1,3,6", help="comma-separated thread counts")
    args = parser.parse_args()
    counts = [int(part) for part in args.threads.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("flower", "paced"):
            if label == "paced":
                linkstate_pacing.serialize_sessions()
                linkstate_pacing.throttle_status_cleanup()
            results[label] = {n: pull_object_requests(Path(tmp) / f"{label}-{n}.db", n, args.requests)
                              for n in counts}
    print("| threads | Flower as is: median / p90 / max ms, req/s | paced: median / p90 / max ms, req/s "
          "| p90 flower/paced | throughput paced/flower |")
    print("|---|---|---|---|---|")
    for n in counts:
        flower, paced = results["flower"][n], results["paced"][n]
        print(f"| {n} | {flower['median']:.2f} / {flower['p90']:.2f} / {flower['max']:.1f}, "
              f"{flower['per_second']:.0f} | {paced['median']:.2f} / {paced['p90']:.2f} / {paced['max']:.1f}, "
              f"{paced['per_second']:.0f} | {flower['p90'] / paced['p90']:.2f}x | "
              f"{paced['per_second'] / flower['per_second']:.2f}x |")


if __name__ == "__main__":
    main()
