"""The rounds as TensorBoard scalars, in ``<tensorboard-dir>/<job-id>/`` (tensorboardX).

Step = round. Each round's scalars are flushed (and fsync'd) before the round loop
goes on, so ``tensorboard --logdir <tensorboard-dir>`` shows a round as soon as it
ends; a resumed job writes a new event file in the same folder, which TensorBoard
reads as one run. ``names.json`` beside the event files maps each tag part made
from a name that was not tag-safe back to the name (server/trackers/base.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tensorboardX import SummaryWriter

from server.job_config import JobConfig
from server.trackers.base import TagNames, Tracker

NAMES_FILE = "names.json"


class TensorBoardTracker(Tracker):
    tool = "TensorBoard"

    def __init__(self, log_dir: Path | str) -> None:
        super().__init__()
        self.log_dir = Path(log_dir)
        # event files are named by the second and the host: a job resumed within the same
        # second would overwrite its earlier file without a suffix of its own
        self.writer = SummaryWriter(log_dir=str(self.log_dir), filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        self._names_written = 0

    @classmethod
    def for_job(cls, cfg: JobConfig) -> "TensorBoardTracker":
        # one folder per job: TensorBoard shows each as a run, next to the others
        return cls(Path(cfg.tensorboard_dir) / TagNames()(cfg.job_id))

    def log_round(self, server_round: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=server_round)
        self.writer.flush()
        if len(self.names.changed) != self._names_written:
            self._write_names()

    def finish(self, error: BaseException | None) -> None:
        self.writer.close()

    def _write_names(self) -> None:
        path = self.log_dir / NAMES_FILE
        # a resumed job adds to what the earlier run of the job wrote
        names = {**(json.loads(path.read_text(encoding="ascii")) if path.exists() else {}), **self.names.changed}
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(names, ensure_ascii=True, indent=1, sort_keys=True) + "\n", encoding="ascii")
        os.replace(temporary, path)
        self._names_written = len(self.names.changed)
