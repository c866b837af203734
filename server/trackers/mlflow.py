"""The rounds as an MLflow run, in a local store at ``<mlflow-dir>/mlflow.db`` (no server).

The store is SQLite, not MLflow's ``file:`` store: MLflow 3 refuses to open a file
store unless ``MLFLOW_ALLOW_FILE_STORE`` is set (it is in maintenance mode), and
SQLite needs no server either. ``mlflow ui --backend-store-uri sqlite:///<mlflow-dir>/mlflow.db``
shows it.

One run per job, in the experiment named by the job id: params = the job's settings
(run-config names), metrics = the same scalars as TensorBoard's (server/trackers/base.py)
with step = round, status FINISHED when the rounds all ran, FAILED (KILLED on Ctrl-C)
when they raised. A job that resumes (its first round is not round 0) continues the
run of its run dir; a changed setting cannot overwrite a param (MLflow params are
immutable), so it is recorded as a ``silotune.changed.<key>`` tag. Tags
``silotune.name.<tag>`` map each tag part made from a name that was not tag-safe back
to the name.

This module imports mlflow (several seconds): server/trackers/__init__.py imports it
only when ``mlflow-dir`` is set.
"""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path
from typing import Iterator, Sequence, TypeVar

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from protos.job_settings import run_config_key
from server.job_config import JobConfig
from server.trackers.base import Tracker

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
RUN_DIR_TAG = "silotune.run_dir"

T = TypeVar("T")


def store_uri(mlflow_dir: Path | str) -> str:
    """The tracking URI of the store in ``mlflow_dir`` (absolute: the job's cwd does not matter)."""
    return f"sqlite:///{(Path(mlflow_dir).resolve() / DB_FILE).as_posix()}"


class MlflowTracker(Tracker):
    tool = "MLflow"

    def __init__(self, cfg: JobConfig) -> None:
        super().__init__()
        self.cfg = cfg
        folder = Path(cfg.mlflow_dir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        self.run_dir = str(Path(cfg.run_dir).resolve())
        self.client = MlflowClient(tracking_uri=store_uri(folder))
        # opened now, so that a store that cannot be used stops the job before its first round
        self.experiment_id = self._experiment(cfg.job_id, folder / ARTIFACTS_DIR)
        self.run_id: str | None = None   # chosen at the first round: a new job's or the resumed one's
        self._names_logged: set[str] = set()

    def log_round(self, server_round: int, scalars: dict[str, float]) -> None:
        run_id = self._run(resuming=server_round > 0)
        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, server_round) for name, value in scalars.items()]
        names = [RunTag(f"silotune.name.{tag}", name[:MAX_TAG_VAL_LENGTH])
                 for tag, name in self.names.changed.items() if tag not in self._names_logged]
        for batch in _batches(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=batch)
        for batch in _batches(names, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=batch)
        self._names_logged.update(tag.key.removeprefix("silotune.name.") for tag in names)

    def finish(self, error: BaseException | None) -> None:
        if error is None:
            status = RunStatus.FINISHED
        else:
            status = RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED
        run_id = self._run(resuming=True)   # a job that failed before its first round gets a run that says so
        if error is not None:
            self.client.set_tag(run_id, "silotune.error", f"{type(error).__name__}: {error}"[:MAX_TAG_VAL_LENGTH])
        self.client.set_terminated(run_id, RunStatus.to_string(status))

    # ---- the experiment and the run ------------------------------------------------
    def _experiment(self, name: str, artifacts: Path) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # artifacts beside the database, not in ./mlruns of whatever the job's cwd is
        return self.client.create_experiment(name, artifact_location=artifacts.as_uri())

    def _run(self, *, resuming: bool) -> str:
        if self.run_id is None:
            earlier = self._earlier_run() if resuming else None
            if earlier is None:
                run = self.client.create_run(self.experiment_id, run_name=self.cfg.job_id,
                                             tags={RUN_DIR_TAG: self.run_dir})
                self.run_id, logged = run.info.run_id, {}
            else:
                self.run_id, logged = earlier.info.run_id, dict(earlier.data.params)
                self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self._log_settings(logged)
        return self.run_id

    def _earlier_run(self):  # type: ignore[no-untyped-def]
        """The latest run of this experiment that logged this run dir, or None."""
        runs = self.client.search_runs([self.experiment_id], order_by=["attributes.start_time DESC"])
        return next((run for run in runs if run.data.tags.get(RUN_DIR_TAG) == self.run_dir), None)

    def _log_settings(self, logged: dict[str, str]) -> None:
        assert self.run_id is not None
        params, changed = [], []
        for setting in fields(self.cfg):
            key = run_config_key(setting.name)
            value = str(getattr(self.cfg, setting.name))[:MAX_PARAM_VAL_LENGTH]
            if key not in logged:
                params.append(Param(key, value))
            elif logged[key] != value:
                changed.append(RunTag(f"silotune.changed.{key}", value))
        for batch in _batches([*params, *changed], MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=[p for p in batch if isinstance(p, Param)],
                                  tags=[t for t in batch if isinstance(t, RunTag)])


def _batches(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
