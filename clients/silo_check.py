"""`silotune agent check`: what an organization's IT sees before joining.

Loads and validates the silo file exactly as a round would, then summarizes
it: schema, counts, the train/test split, label distribution, token lengths
and how many examples would be truncated. Nothing is sent anywhere; the
summary holds counts and statistics only, never a record.

Given the job's task spec (``--job JOB.yaml``: protos/task_spec.py), it shows
how the file maps onto that task: the job's labels this file lacks, the rows
whose label the job does not know (which the job refuses or skips), and the
exact prompt every organization renders, with a placeholder for the row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from clients.formatting import encode_example
from clients.silo import load_silo, split_silo
from protos.job_settings import JobSettings, SettingsError
from protos.task_spec import TaskSpec


@dataclass
class SiloSummary:
    path: str
    task: str
    rows: int
    train: int
    test: int
    labels: dict[str, int] = field(default_factory=dict)          # label -> count (classification)
    tokens: dict[str, float] = field(default_factory=dict)        # min / p50 / p95 / max of prompt+answer
    truncated: int = 0
    max_length: int = 0
    # under a job's task spec (empty without one)
    task_fingerprint: str = ""
    job_labels: list[str] = field(default_factory=list)
    labels_not_in_file: list[str] = field(default_factory=list)   # the job's labels no row here holds
    labels_not_in_job: dict[str, int] = field(default_factory=dict)  # label -> rows the job does not know
    refused: str = ""                                               # why a round would refuse this file

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_silo(path: str | Path, *, model: str = "smollm2-135m", max_length: int = 160,
               test_fraction: float = 0.2, seed: int = 0, spec: TaskSpec | None = None) -> SiloSummary:
    """Validate and summarize a silo file (raises the named SiloError on a bad file).

    With ``spec`` the file is read as a round of that job reads it, except
    that rows outside the job's label set are counted rather than fatal, so
    the summary can say which they are."""
    from runtime.base_model import load_tokenizer

    lenient = replace(spec, unknown_labels="skip") if spec is not None and spec.labels else spec
    silo = load_silo(path, spec=lenient)
    train, test = split_silo(silo, test_fraction=test_fraction, seed=seed)
    tokenizer = load_tokenizer(model)
    system = spec.system_prompt if spec is not None else ""
    full = [encode_example(tokenizer, e.prompt, e.answer, max_length=1_000_000, messages=e.messages,
                           system_prompt=system) for e in silo.examples]
    lengths = np.array([len(e.input_ids) for e in full])
    summary = SiloSummary(
        path=str(path),
        task=silo.task,
        rows=len(silo),
        train=len(train),
        test=len(test),
        labels=dict(sorted(Counter(e.label for e in silo.examples if e.label is not None).items())),
        tokens={"min": float(lengths.min()), "p50": float(np.percentile(lengths, 50)),
                "p95": float(np.percentile(lengths, 95)), "max": float(lengths.max())},
        truncated=int((lengths > max_length).sum()),
        max_length=max_length,
    )
    if spec is not None:
        _compare_with_job(summary, path, spec, silo.labels)
    return summary


def _compare_with_job(summary: SiloSummary, path: str | Path, spec: TaskSpec, labels: tuple[str, ...]) -> None:
    summary.task_fingerprint = spec.fingerprint()
    summary.job_labels = list(labels) if summary.task == "classification" else []
    if not spec.labels or summary.task != "classification":
        return
    own = Counter(e.label for e in load_silo(path).examples)  # the file's labels, job or not
    summary.labels_not_in_file = [label for label in spec.labels if label not in own]
    summary.labels_not_in_job = {label: n for label, n in sorted(own.items()) if label not in spec.labels}
    if summary.labels_not_in_job and spec.unknown_labels == "error":
        summary.refused = (f"{sum(summary.labels_not_in_job.values())} row(s) have a label outside the job's "
                           "label set, and the job says unknown-labels=error: this organization would refuse it")


def job_from_file(path: str | Path) -> JobSettings:
    """A job file's settings: a scenario file (its ``run-config`` section) or a plain mapping of
    run-config keys, as YAML or JSON. A bad file or key is a SettingsError naming it."""
    import yaml

    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise SettingsError(f"{file}: cannot read the job file ({err})") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{file}: a job file is a mapping of run-config keys (or a scenario file)")
    run_config = raw.get("run-config", raw) if "run-config" in raw else raw
    if not isinstance(run_config, dict):
        raise SettingsError(f"{file}: run-config must be a mapping")
    try:
        return JobSettings.from_run_config(run_config)
    except SettingsError as err:
        raise SettingsError(f"{file}: {err}") from None
