"""`silotune export`: a job's checkpoint as a PEFT adapter folder, with provenance (the coordinator's side)."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.console import console


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export", help="export a run's checkpoint as a PEFT adapter folder")
    p.add_argument("--run-dir", required=True, help="the job's run dir (holds checkpoints/)")
    p.add_argument("--out", required=True, help="target folder (must be absent or empty)")
    p.add_argument("--round", type=int, help="a specific round (default: the latest valid one)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=export)


def export(args: argparse.Namespace) -> int:
    from server.checkpoint import CheckpointStore
    from server.export import export_specialist

    store = CheckpointStore(Path(args.run_dir) / "checkpoints")
    checkpoint = store.load(args.round) if args.round is not None else store.latest()
    if checkpoint is None:
        raise FileNotFoundError(f"no valid checkpoint under {args.run_dir}/checkpoints")
    history = checkpoint.run_state.get("history", [])
    organizations = sorted({org for h in history for org in h.get("eval", {})})
    provenance = {
        "job_id": checkpoint.run_state.get("job_id"),
        "strategy": checkpoint.run_state.get("strategy"),
        "rounds": checkpoint.round,
        "organizations": organizations,
        "num_organizations": len(organizations),
        "base_model_fingerprint": checkpoint.run_state.get("fingerprint"),
    }
    out = export_specialist(checkpoint, args.out, provenance, overwrite=args.overwrite)
    console.print(f"exported round {checkpoint.round} to {out}")
    return 0
