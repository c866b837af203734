"""A job's own task, deployed: three organizations with their own files (CSV, JSONL, Parquet)
on a data set none of the built-in scenarios uses, each holding a different subset of the
labels. The job declares its task; every organization renders the same prompt, and the report
has base, local-only and federated for each organization. Every process stopped by PID."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from protos.job_settings import JobSettings
from protos.task_spec import TaskSpec
from test_deployment import SETTINGS, deploy

pytestmark = pytest.mark.slow

LABELS = ["billing", "outage", "refund", "account"]
SUBJECTS = {
    "billing": ["charged twice", "wrong VAT on invoice", "card billed after cancelling", "invoice missing"],
    "outage": ["dashboard down", "API returns 503", "login page times out", "sync stopped overnight"],
    "refund": ["refund the annual plan", "money back for broken order", "return label for refund",
               "refund not received"],
    "account": ["change account email", "two-factor codes never arrive", "merge two accounts",
                "delete my account"],
}


def tickets(labels: list[str], org: str) -> list[dict[str, str]]:
    return [{"text": f"{org} customer {i}: {subject}, please help", "label": label}
            for label in labels for subject in SUBJECTS[label] for i in range(3)]


def test_three_organizations_with_different_label_subsets_share_one_prompt(tmp_path: Path) -> None:
    a, b, c = tickets(["billing", "outage"], "A"), tickets(["refund", "account", "billing"], "B"), \
        tickets(["outage", "account"], "C")
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "insurer-a.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(a)
    (data / "insurer-b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b))
    pq.write_table(pa.Table.from_pylist(c), data / "insurer-c.parquet")

    task = {"task": "classification", "task-labels": ",".join(LABELS),
            "system-prompt": "You route insurance support tickets.", "local-baseline": "true"}
    settings = {**SETTINGS, "job-id": "tickets", "min-nodes": 3, **task}
    run_dir = deploy(tmp_path, settings, [data / "insurer-a.csv", data / "insurer-b.jsonl",
                                          data / "insurer-c.parquet"])
    orgs = ["insurer-a", "insurer-b", "insurer-c"]

    # every organization logged the same prompt format, with the job's labels in the job's order
    spec = TaskSpec.from_config(JobSettings.from_run_config(settings))
    rendered = {}
    for org in orgs:
        log = (tmp_path / org / "supernode.log").read_text()
        found = set(re.findall(rf"{org}: \d+ classification examples; task {spec.fingerprint()[:16]} "
                               r"renders each as ('.*')$", log, re.MULTILINE))
        assert len(found) == 1, log[-3000:]
        rendered[org] = found.pop()
    assert len(set(rendered.values())) == 1, rendered
    prompt = next(iter(rendered.values()))
    assert "categories: billing, outage, refund, account." in prompt
    assert "You route insurance support tickets." in prompt

    # base, local-only and federated for each organization
    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["organizations"]) == orgs
    for org in orgs:
        row = report["organizations"][org]
        for column in ("base", "local", "specialist"):
            assert {"accuracy", "perplexity"} <= set(row[column]), (org, column, row)
    assert not any(k.startswith("local_") for k in report["history"][0]["eval"]["insurer-a"])  # round 0: base

    # the specialist names its task: fingerprint in the provenance, labels and system prompt on its card
    provenance = json.loads((run_dir / "specialist" / "provenance.json").read_text())
    assert provenance["task_spec"]["fingerprint"] == spec.fingerprint()
    assert provenance["labels"] == LABELS
    card = (run_dir / "specialist" / "README.md").read_text()
    assert "`billing`, `outage`, `refund`, `account`" in card and "You route insurance support tickets." in card
    assert "please help" not in json.dumps(report) + json.dumps(provenance) + card  # no record left
