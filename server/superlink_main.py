"""`flower-superlink`, paced for a deployment's many small requests: the SuperLink silotune starts.

    python -m server.superlink_main [--status-cleanup-interval S] -- <flower-superlink arguments>

A deployed round moves each message as several Flower objects, one HTTP
request each, and every request costs the SuperLink its middleware and a few
SQL transactions; on a coordinator that shares its cores, that cost was most of
an organization-round's overhead beyond training (benchmarks/deployment.py
--trace). Before Flower's own `flower-superlink` main runs, in this process
only:

- server/linkstate_pacing.py: database sessions one at a time, and the
  expired-token cleanup of run-status reads at most once a second;
- server/superlink_middleware.py: Control-, Fleet- and tracing-only middleware
  skipped by the requests outside its scope.

Each refuses to start (`FlowerPacingUnsupported`) when the installed Flower is
not the one it was written for. server/superlink.py starts the SuperLink this
way (`SuperLinkProcess.start(paced=False)` runs Flower's script unchanged).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from server import linkstate_pacing, superlink_middleware


def main(argv: Sequence[str] | None = None) -> None:
    """Our options, `--`, then Flower's (module doc)."""
    args = list(sys.argv[1:] if argv is None else argv)
    ours, flower_args = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else ([], args)
    parser = argparse.ArgumentParser(prog="python -m server.superlink_main",
                                     description="flower-superlink, paced for many small requests")
    parser.add_argument("--status-cleanup-interval", type=float, default=linkstate_pacing.STATUS_CLEANUP_INTERVAL,
                        help="seconds between two expired-token cleanups run by run-status reads")
    options = parser.parse_args(ours)
    linkstate_pacing.serialize_sessions()
    linkstate_pacing.throttle_status_cleanup(options.status_cleanup_interval)
    superlink_middleware.scope_middleware()
    from flwr.superlink.cli.flower_superlink import flower_superlink  # pylint: disable=import-outside-toplevel

    sys.argv = ["flower-superlink", *flower_args]  # Flower parses sys.argv and names itself by argv[0]
    flower_superlink()


if __name__ == "__main__":
    main()
