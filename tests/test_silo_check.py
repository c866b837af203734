"""`agent check`: the summary of a silo file, computed locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.silo import SiloMissingColumn
from clients.silo_check import check_silo


def test_summary_counts_labels_split_and_lengths(tmp_path: Path) -> None:
    path = tmp_path / "silo.jsonl"
    rows = [{"text": "short text " * (1 + i % 3), "label": "a" if i % 4 else "b"} for i in range(40)]
    rows.append({"text": "very long " * 400, "label": "a"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = check_silo(path, model="tiny-llama", max_length=96)
    assert summary.task == "classification" and summary.rows == 41
    assert summary.train + summary.test == 41 and summary.test >= 1
    assert summary.labels == {"a": 31, "b": 10}
    assert summary.tokens["max"] > 96 >= summary.tokens["p50"]
    assert summary.truncated == 1
    text = json.dumps(summary.as_dict())
    assert "short text" not in text and "very long" not in text  # statistics only, no record


def test_bad_file_is_the_named_error(tmp_path: Path) -> None:
    path = tmp_path / "silo.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(SiloMissingColumn):
        check_silo(path, model="tiny-llama")
