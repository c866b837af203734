"""The ServerApp: silotune's own round loop on Flower's Grid.

``flwr run .`` loads ``app`` from here (pyproject ``[tool.flwr.app.components]``)
and passes the run config; ``silotune simulate`` builds the same loop with
``make_server_app`` and its scenario's settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from runtime.flower_backoff import shorten_object_backoff
from server.events import EVENTS_FILE, EventsFile, TeeObserver
from server.export import export_specialist
from server.job import Job, LogObserver, RoundObserver
from server.job_config import JobConfig
from server.report import build_report, weight_cap, write_report
from server.trackers import finishing, trackers_for
from server.specialists import init_adapter_provenance
from server.traffic import bytes_moved

log = logging.getLogger("silotune.server")

SPECIALIST_DIR = "specialist"


def run_job(grid: Grid, cfg: JobConfig, observer: RoundObserver | None = None) -> Path:
    """Run (or resume) the job to its last round; export it; write the report.

    The rounds go to ``observer`` (default: the log) and, for every job, to
    ``<run-dir>/events.jsonl`` (server/events.py), which a resumed job appends to."""
    events = EventsFile(Path(cfg.run_dir) / EVENTS_FILE, cfg.job_id)
    # the file first: whoever reads an event's log line finds the event in the file
    trackers = trackers_for(cfg)   # TensorBoard, MLflow: those the job's settings turn on
    job = Job(grid, cfg, TeeObserver(events, observer or LogObserver(), *trackers))
    with finishing(trackers):   # each run ends FINISHED, or FAILED if the rounds raised
        final = job.run()
    history = final.run_state["history"]
    organizations = sorted({org for h in history for org in h["eval"]})
    provenance = {
        "job_id": cfg.job_id,
        "strategy": cfg.strategy,
        "secure_aggregation": cfg.secure_aggregation,  # the coordinator saw only sums of updates
        "rounds": final.round,
        "organizations": organizations,
        "num_organizations": len(organizations),
        "base_model_fingerprint": job.fingerprint,
        "seed": cfg.seed,
        **weight_cap(history),   # max_weight: how far one organization's example count could weigh
        **task_provenance(cfg),
        **init_adapter_provenance(cfg.init_adapter),  # continued training: the specialist it started from
        "bytes_moved": bytes_moved(history),   # instructions down + replies up, every round (server/traffic.py)
        # a lossy global encoding: the specialist sits on its grid, or with global-delta moved by quantized
        # differences (server/downlink.py)
        "encodings": {"update": cfg.update_encoding, "global": cfg.global_encoding, "global_delta": cfg.global_delta},
    }
    if job.privacy is not None:  # the (ε, δ) spent, for whoever receives the adapter
        provenance["differential_privacy"] = job.privacy.provenance()
    if job.stop_reason:
        provenance["stopped_early"] = job.stop_reason
    run_dir = Path(cfg.run_dir)
    out = export_specialist(final, run_dir / SPECIALIST_DIR, provenance, overwrite=True, history=history)
    meta = {"job_id": cfg.job_id, "model": cfg.model, "strategy": cfg.strategy, "specialist": str(out),
            "metric": headline_metric(cfg, history), "task_spec_fingerprint": cfg.task_spec.fingerprint()}
    for key in ("differential_privacy", "stopped_early", "init_adapter", "bytes_moved", "encodings"):
        if key in provenance:
            meta[key] = provenance[key]
    report = build_report(history, meta)
    write_report(run_dir, report)
    log.info("specialist exported to %s", out)
    return out


def task_provenance(cfg: JobConfig) -> dict:
    """What the specialist learned: the job's task spec and its fingerprint (protos/task_spec.py);
    the task and labels when the job declared them (with ``auto`` each organization's file decided,
    and the coordinator never learns its labels)."""
    spec = cfg.task_spec
    out: dict = {"task_spec": {**spec.as_dict(), "fingerprint": spec.fingerprint()}}
    if spec.kind != "auto":
        out["task"] = spec.kind
    if spec.labels:
        out["task"], out["labels"] = "classification", list(spec.labels)
    return out


def headline_metric(cfg: JobConfig, history: list[dict]) -> str:
    """The job's metric; with ``auto``, what the organizations' silos made of it: accuracy when
    they evaluated a classification task, perplexity otherwise."""
    classified = any("accuracy" in metrics for h in history for metrics in h["eval"].values())
    return cfg.task_spec.headline_metric("classification" if classified else "instruction")


def make_server_app(cfg: JobConfig | None = None, observer: RoundObserver | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; without one, it reads the Flower run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _show_progress()
        _pull_replies_promptly()
        run_job(grid, cfg or JobConfig.from_run_config(context.run_config), observer)

    return server_app


def _pull_replies_promptly() -> None:
    """A reply is listed while its SuperNode still pushes its arrays; Flower's grid then waits
    1 s, then 2 s, before asking for them again (runtime/flower_backoff.py): most of a
    deployed round trip's way back. Ask after 0.05 s, up to every 0.2 s, in this process."""
    from flwr.superlink.grid import http_grid

    shorten_object_backoff(http_grid, "pull_objects", 0.05, 0.2)


def _show_progress() -> None:
    """In the process Flower starts for the ServerApp nobody has configured logging, so
    the round log (sampled, accepted/rejected, evaluated) would be dropped; Flower keeps
    the process's output as the run's log, which `silotune coordinator` relays live."""
    if not logging.getLogger().handlers:  # `silotune simulate` configured its own: leave it
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        logging.getLogger("flwr").propagate = False  # Flower prints through its own handler
        # not a line per Runtime API request: Flower uploads the log every 0.2 s with a request of
        # its own, whose line would be uploaded 0.2 s later, and so on for as long as the run lasts
        logging.getLogger("httpx").setLevel(logging.WARNING)


app = make_server_app()
