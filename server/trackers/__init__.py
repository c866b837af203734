"""The round events, also in the tools users already look at: TensorBoard and MLflow.

Each is a ``RoundObserver`` (server/job.py) that ``run_job`` (server/app.py) adds
next to the events file when the job's settings ask for it:

* ``tensorboard-dir``: TensorBoard scalars in ``<tensorboard-dir>/<job-id>/`` (tensorboard.py);
* ``mlflow-dir``: one MLflow run per job in a SQLite store in that folder (mlflow.py;
  needs the ``tracking`` extra, ``pip install 'silotune[tracking]'``).

Both log the same scalars per round (base.py): training loss and time, every
organization's evaluation metrics and their means, the round's counts, ε under
differential privacy. Their libraries are imported only when a job turns them on
(importing either takes seconds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from server.job_config import JobConfig
from server.trackers.base import Tracker


def trackers_for(cfg: JobConfig) -> list[Tracker]:
    """The trackers ``cfg`` turns on (none by default)."""
    trackers: list[Tracker] = []
    if cfg.tensorboard_dir:
        from server.trackers.tensorboard import TensorBoardTracker

        trackers.append(TensorBoardTracker.for_job(cfg))
    if cfg.mlflow_dir:
        try:
            from server.trackers.mlflow import MlflowTracker
        except ImportError as missing:
            raise RuntimeError(f"mlflow-dir is set, but MLflow is not installed ({missing}): "
                               "pip install 'silotune[tracking]'") from missing
        trackers.append(MlflowTracker(cfg))
    return trackers


@contextmanager
def finishing(trackers: Sequence[Tracker]) -> Iterator[None]:
    """Closes each tracker when the block ends, with the exception that ended it, if any
    (MLflow: FINISHED, FAILED, KILLED)."""
    try:
        yield
    except BaseException as error:
        for tracker in trackers:
            tracker.close(error)
        raise
    for tracker in trackers:
        tracker.close()
