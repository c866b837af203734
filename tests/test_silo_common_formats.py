"""Common data formats and column layouts a new organization arrives with (issue 12).

JSON arrays, Hugging Face ``datasets`` folders, chat ``messages``, TRL's
prompt/completion and Alpaca's instruction/input/output all load into the same
instruction examples; malformed rows get a named error with the row number.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from clients.silo import (
    Example,
    SiloFileNotFound,
    SiloFormatError,
    SiloMissingColumn,
    load_silo,
)
from clients.silo.errors import SiloMalformedRow
from clients.silo_check import check_silo

MESSAGES = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris"}]},
    {"messages": [{"role": "system", "content": "Be kind."},
                  {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Bye"},
                  {"role": "assistant", "content": "Goodbye!"}]},
]
MESSAGES_EXPECTED = [
    Example("What is 2+2?", "4"),
    # more than one user turn and its answer: the turns are kept too, for the chat template
    Example("You are terse.\n\nCapital of France?", "Paris",
            messages=(("system", "You are terse."), ("user", "Capital of France?"), ("assistant", "Paris"))),
    Example("Be kind.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Bye", "Goodbye!",
            messages=(("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"),
                      ("assistant", "Goodbye!"))),
]

PROMPT_COMPLETION = [
    {"prompt": "The sky is", "completion": " blue."},
    {"prompt": "Grass is", "completion": "green"},
]
PROMPT_COMPLETION_EXPECTED = [Example("The sky is", "blue."), Example("Grass is", "green")]

CONVERSATIONAL_PC = [
    {"prompt": [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Colour of the sky?"}],
     "completion": [{"role": "assistant", "content": "Blue"}]},
]
CONVERSATIONAL_PC_EXPECTED = [Example(
    "Answer in one word.\n\nColour of the sky?", "Blue",
    messages=(("system", "Answer in one word."), ("user", "Colour of the sky?"), ("assistant", "Blue")))]

ALPACA = [
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red"},
    {"instruction": "Say hi.", "output": "hi"},  # no input key at all
]
ALPACA_EXPECTED = [
    Example("Translate to French.\n\ncat", "chat"),
    Example("Name a primary colour.", "Red"),
    Example("Say hi.", "hi"),
]

CASES = {
    "messages": (MESSAGES, MESSAGES_EXPECTED),
    "prompt-completion": (PROMPT_COMPLETION, PROMPT_COMPLETION_EXPECTED),
    "conversational-prompt-completion": (CONVERSATIONAL_PC, CONVERSATIONAL_PC_EXPECTED),
    "alpaca": (ALPACA, ALPACA_EXPECTED),
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path


def write_datasets_folder(folder: Path, rows: list[dict], shards: int = 1) -> Path:
    """What ``Dataset.save_to_disk`` writes: Arrow IPC stream shards + dataset_info.json + state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    step = -(-len(rows) // shards)
    for i, name in enumerate(names):
        part = table.slice(i * step, step)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}, "citation": "", "description": ""}))
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": "0123456789abcdef", "_format_columns": None, "_format_kwargs": {},
        "_format_type": None, "_output_all_columns": False, "_split": "train",
    }))
    return folder


# ---------------------------------------------------------------- layouts
@pytest.mark.parametrize("case", list(CASES))
def test_each_layout_loads_into_the_expected_examples(tmp_path: Path, case: str) -> None:
    rows, expected = CASES[case]
    silo = load_silo(write_jsonl(tmp_path / "silo.jsonl", rows))
    assert silo.task == "instruction" and silo.labels == ()
    assert silo.examples == expected


@pytest.mark.parametrize("case", list(CASES))
def test_jsonl_json_array_data_wrapper_and_datasets_folder_give_identical_silos(tmp_path: Path, case: str) -> None:
    rows, expected = CASES[case]
    silos = [
        load_silo(write_jsonl(tmp_path / "silo.jsonl", rows)),
        load_silo(write_json(tmp_path / "silo.json", rows)),
        load_silo(write_json(tmp_path / "wrapped.json", {"data": rows})),
        load_silo(write_datasets_folder(tmp_path / "ds", rows)),
    ]
    if len(rows) > 1:  # JSON Lines named .json (Dataset.to_json); one line would be one object
        silos.append(load_silo(write_jsonl(tmp_path / "lines.json", rows)))
    for silo in silos:
        assert (silo.task, silo.examples, silo.labels) == ("instruction", expected, ())


def test_a_single_user_turn_chat_equals_the_instruction_response_file(tmp_path: Path) -> None:
    chat = load_silo(write_jsonl(tmp_path / "chat.jsonl", MESSAGES[:1]))
    plain = load_silo(write_jsonl(tmp_path / "plain.jsonl", [{"instruction": "What is 2+2?", "response": "4"}]))
    assert chat.examples == plain.examples


def test_classification_json_array_and_datasets_folder(tmp_path: Path) -> None:
    rows = [{"text": f"doc {i}", "label": i % 2} for i in range(6)]
    reference = load_silo(write_jsonl(tmp_path / "c.jsonl", rows))
    for path in (write_json(tmp_path / "c.json", rows), write_datasets_folder(tmp_path / "cds", rows, shards=2)):
        silo = load_silo(path)
        assert (silo.task, silo.examples, silo.labels) == (reference.task, reference.examples, ("0", "1"))


def test_forcing_the_instruction_task_accepts_any_instruction_layout(tmp_path: Path) -> None:
    silo = load_silo(write_jsonl(tmp_path / "a.jsonl", ALPACA), task="instruction")
    assert silo.examples == ALPACA_EXPECTED
    with pytest.raises(SiloMissingColumn, match="'messages'"):
        load_silo(write_jsonl(tmp_path / "c.jsonl", [{"text": "x", "label": "y"}]), task="instruction")


def test_null_fields_are_dropped_and_counted_like_any_missing_field(tmp_path: Path, caplog) -> None:
    rows = [*MESSAGES[:1], {"messages": None}, {"other": 1}]
    silo = load_silo(write_jsonl(tmp_path / "n.jsonl", rows))
    assert silo.examples == MESSAGES_EXPECTED[:1]
    assert "dropped 2 of 3 rows" in caplog.text


# ---------------------------------------------------------------- errors
def test_an_unknown_layout_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(SiloMissingColumn) as info:
        load_silo(write_json(tmp_path / "u.json", [{"query": "q", "reply": "r"}]))
    message = str(info.value)
    for name in ("'instruction' + 'response'", "'text' + 'label'", "'messages'", "'prompt' + 'completion'",
                 "'instruction' + 'output'", "'query'", "'reply'"):
        assert name in message


MALFORMED = {
    "no assistant turn": ([{"messages": [{"role": "user", "content": "hi"}]}],
                          r"row 2: 'messages' has no assistant turn"),
    "non-string content": ([{"messages": [{"role": "user", "content": ["hi"]},
                                          {"role": "assistant", "content": "ok"}]}],
                           r"row 2: 'messages' message 1 \(user\) has a list content, not a string"),
    "null content": ([{"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": None}]}],
                     r"row 2: 'messages' message 2 \(assistant\) has a NoneType content"),
    "unknown role": ([{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
                     r"row 2: 'messages' message 1 has unknown role 'human'; known roles: system, user"),
    "not a list": ([{"messages": "hi"}], r"row 2: 'messages' must be a list"),
    "not a message object": ([{"messages": ["hi", "there"]}], r"row 2: 'messages' message 1 is not a"),
    "no user turn": ([{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}],
                     r"row 2: 'messages' has no user turn before its last assistant turn"),
    "answer not in completion": ([{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                   "completion": [{"role": "user", "content": "more"}]}],
                                 r"row 2: 'completion' has no assistant turn in 'completion'"),
    "mixed prompt/completion": ([{"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}],
                                r"row 2: 'prompt' and 'completion' must both be strings or both message lists"),
    "non-string alpaca input": ([{"instruction": "Add one.", "input": 41, "output": "42"}],
                                r"row 2: 'input' is a int, not a string"),
}
GOOD_FIRST_ROW = {
    "no assistant turn": MESSAGES[0], "non-string content": MESSAGES[0], "null content": MESSAGES[0],
    "unknown role": MESSAGES[0], "not a list": MESSAGES[0], "not a message object": MESSAGES[0],
    "no user turn": MESSAGES[0], "answer not in completion": CONVERSATIONAL_PC[0],
    "mixed prompt/completion": CONVERSATIONAL_PC[0], "non-string alpaca input": ALPACA[0],
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_row_is_a_named_error_with_its_row(tmp_path: Path, case: str) -> None:
    bad, pattern = MALFORMED[case]
    rows = [GOOD_FIRST_ROW[case], *bad]
    for path in (write_jsonl(tmp_path / "bad.jsonl", rows), write_json(tmp_path / "bad.json", rows)):
        with pytest.raises(SiloMalformedRow, match=pattern) as info:
            load_silo(path)
        assert isinstance(info.value, SiloFormatError) and str(path) in str(info.value)


@pytest.mark.parametrize("document, pattern", [
    ("[1, 2]", "array element 1: expected a JSON object, got int"),
    ('{"rows": []}', r"expected a JSON array of objects \(or \{\"data\": \[...\]\}\), got an object with keys 'rows'"),
    ('"text"', "expected a JSON array of objects, got str"),
    ('[{"a": 1},\n {"a": }]', "line 2, column"),
])
def test_a_json_file_that_is_not_an_array_of_objects_is_refused(tmp_path: Path, document: str, pattern: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(document)
    with pytest.raises(SiloFormatError, match=pattern):
        load_silo(path)


def test_an_empty_json_array_is_an_empty_file(tmp_path: Path) -> None:
    from clients.silo import SiloFileEmpty

    with pytest.raises(SiloFileEmpty, match="empty JSON array"):
        load_silo(write_json(tmp_path / "e.json", []))


def test_folders_that_are_not_a_datasets_folder_get_named_errors(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("x")
    with pytest.raises(SiloFileNotFound, match="not a regular file.*datasets folder"):
        load_silo(plain)
    no_data = tmp_path / "no_data"
    no_data.mkdir()
    (no_data / "dataset_info.json").write_text("{}")
    with pytest.raises(SiloFormatError, match=r"without any \.arrow data file"):
        load_silo(no_data)
    split = write_datasets_folder(tmp_path / "dd" / "train", MESSAGES)
    (split.parent / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(SiloFormatError, match="DatasetDict folder.*dd/train"):
        load_silo(split.parent)
    assert load_silo(split).examples == MESSAGES_EXPECTED  # the split's own folder loads
    broken = write_datasets_folder(tmp_path / "broken", MESSAGES)
    (broken / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(SiloFormatError, match="not an Arrow IPC stream or file"):
        load_silo(broken)


def test_a_single_arrow_file_loads(tmp_path: Path) -> None:
    folder = write_datasets_folder(tmp_path / "ds", ALPACA)
    assert load_silo(folder / "data-00000-of-00001.arrow").examples == ALPACA_EXPECTED


# ---------------------------------------------------------------- agent check
def test_agent_check_works_on_every_format_and_layout(tmp_path: Path) -> None:
    paths = [
        write_jsonl(tmp_path / "messages.jsonl", MESSAGES),
        write_json(tmp_path / "pc.json", PROMPT_COMPLETION + CONVERSATIONAL_PC),
        write_json(tmp_path / "alpaca.json", {"data": ALPACA}),
        write_datasets_folder(tmp_path / "ds", MESSAGES),
    ]
    for path, rows in zip(paths, (3, 3, 3, 3)):
        summary = check_silo(path, model="tiny-llama")
        assert summary.task == "instruction" and summary.rows == rows and summary.train + summary.test == rows
