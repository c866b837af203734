"""Adding a silo file format is adding one module: readers.py and load_silo are not edited.

The module below is written to a temporary directory put on the package's
``__path__`` (a module dropped into clients/silo/formats/ is found the same
way), and a ``.tsv`` silo file is loaded through ``load_silo``. It is removed
again afterwards, so the other tests see the built-in formats only.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

import clients.silo
import clients.silo.formats
from clients.silo import SiloFileEmpty, SiloFormatError, SiloMissingColumn, load_silo, render_classification_prompt
from clients.silo.formats import FORMATS, RawTable, SiloFormat, by_extension

BUILT_IN = (".jsonl", ".json", ".csv", ".parquet", ".arrow")

# the whole of what a contributor writes (besides its test)
TSV_SOURCE = '''
"""tsv: tab-separated values, a header row then data rows; no quoting (IANA text/tab-separated-values)."""

from __future__ import annotations

from pathlib import Path

from clients.silo.errors import SiloFileEmpty, SiloFormatError
from clients.silo.formats import RawTable, SiloFormat, decode_utf8, register_format, table_from_columns


@register_format("tsv")
class Tsv(SiloFormat):
    extensions = (".tsv",)

    @classmethod
    def read(cls, path: Path) -> RawTable:
        lines = [(n, line.rstrip("\\r")) for n, line in enumerate(decode_utf8(path.read_bytes(), path).split("\\n"), 1)]
        lines = [(n, line) for n, line in lines if line.strip()]
        if not lines:
            raise SiloFileEmpty(f"{path}: file has no content")
        header = [name.strip() for name in lines[0][1].split("\\t")]
        columns: dict[str, list[object]] = {name: [] for name in header}
        for lineno, line in lines[1:]:
            cells = line.split("\\t")
            if len(cells) > len(header):
                raise SiloFormatError(f"{path}: line {lineno}: {len(cells)} cells, header has {len(header)}")
            for i, name in enumerate(header):
                columns[name].append(cells[i] if i < len(cells) else None)
        if len(lines) == 1:
            raise SiloFileEmpty(f"{path}: header only, no data rows")
        return table_from_columns(columns, len(lines) - 1)
'''

# a second format for ".csv": must be refused, not silently win or lose by import order
SEMICOLON_SOURCE = '''
"""semicolon: European-locale CSV, which also ends in .csv."""

from __future__ import annotations

from clients.silo.formats import SiloFormat, register_format, table_from_columns


@register_format("semicolon")
class Semicolon(SiloFormat):
    extensions = (".csv", ".ssv")

    @classmethod
    def read(cls, path):
        return table_from_columns({}, 0)
'''

# a text a CSV reader would mangle (leading quote, commas), kept verbatim by TSV
ROWS = [
    ('"Rates cut", says the bank; growth 3,5%', "business"),
    ("The striker scored twice, then again", "sports"),
    ("Parliament passed the bill", "politics"),
]


def _plug(tmp_path: Path, module: str, source: str) -> Iterator[Path]:
    """clients/silo/formats/ extended by ``module``; afterwards the registry is as before."""
    before = FORMATS.names()
    folder = tmp_path / "formats"
    folder.mkdir()
    (folder / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    importlib.invalidate_caches()
    registered = []
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(clients.silo.formats, "__path__", [*clients.silo.formats.__path__, str(folder)])
            FORMATS.names()  # scan now, so the cleanup knows what this module registered
            registered = [name for name in FORMATS.names() if name not in before]
            yield tmp_path
    finally:
        # the path is restored first, so the scan below cannot import the module again
        for name in registered:
            if name in FORMATS:  # a test may have removed it already
                FORMATS.unregister(name)
        sys.modules.pop(f"clients.silo.formats.{module}", None)
        if hasattr(clients.silo.formats, module):
            delattr(clients.silo.formats, module)
    assert FORMATS.names() == before
    assert clients.silo.SUPPORTED_EXTENSIONS == BUILT_IN


@pytest.fixture
def tsv_plugin(tmp_path: Path) -> Iterator[Path]:
    yield from _plug(tmp_path, "tsv", TSV_SOURCE)


@pytest.fixture
def clashing_plugin(tmp_path: Path) -> Iterator[Path]:
    yield from _plug(tmp_path, "semicolon", SEMICOLON_SOURCE)


def _tsv_bytes() -> bytes:
    return ("text\tlabel\r\n" + "".join(f"{t}\t{label}\r\n" for t, label in ROWS) + "\n").encode("utf-8")


def test_the_built_in_formats_are_listed_in_their_order() -> None:
    from clients.silo import SUPPORTED_EXTENSIONS

    assert SUPPORTED_EXTENSIONS == clients.silo.supported_extensions() == BUILT_IN
    assert FORMATS.names() == ["jsonl", "json", "csv", "parquet", "arrow"]
    for name, fmt in FORMATS.items():
        assert fmt.name == name and fmt.__module__ == f"clients.silo.formats.{name}"


def test_the_csv_format_module_does_not_shadow_the_standard_csv_module() -> None:
    import csv

    FORMATS.names()  # every format module imported
    assert sys.modules["clients.silo.formats.csv"] is not csv
    assert Path(csv.__file__).parent != Path(clients.silo.formats.__file__).parent
    assert sys.modules["clients.silo.formats.csv"].csv is csv  # it, too, uses the standard one
    assert callable(csv.reader) and csv.QUOTE_MINIMAL == 0


def test_a_new_silo_format_module_is_read_by_load_silo(tsv_plugin: Path) -> None:
    assert FORMATS.get("tsv").__module__ == "clients.silo.formats.tsv"
    assert clients.silo.SUPPORTED_EXTENSIONS == (*BUILT_IN, ".tsv")  # after the built-ins (list_order)

    path = tsv_plugin / "news.tsv"
    path.write_bytes(_tsv_bytes())
    silo = load_silo(path)
    labels = ("business", "politics", "sports")
    assert silo.task == "classification" and silo.labels == labels and silo.source == str(path)
    assert [(e.answer, e.label) for e in silo.examples] == [(label, label) for _, label in ROWS]
    assert [e.prompt for e in silo.examples] == [render_classification_prompt(t, labels) for t, _ in ROWS]
    assert silo.examples[0].prompt.count('"Rates cut", says the bank; growth 3,5%') == 1

    # matched case-insensitively, like the built-ins
    upper = tsv_plugin / "NEWS.TSV"
    upper.write_bytes(_tsv_bytes())
    assert load_silo(upper).examples == silo.examples

    # the same bytes as .csv go to the CSV format: one column named "text\tlabel"
    as_csv = tsv_plugin / "news.csv"
    as_csv.write_bytes(_tsv_bytes())
    with pytest.raises(SiloMissingColumn, match=r"'text\\tlabel'"):
        load_silo(as_csv)

    # read_table's own checks come first; the module's own errors come through as they are
    (tsv_plugin / "zero.tsv").write_bytes(b"")
    with pytest.raises(SiloFileEmpty, match=r"zero\.tsv: file is empty \(0 bytes\)"):
        load_silo(tsv_plugin / "zero.tsv")
    (tsv_plugin / "head.tsv").write_text("text\tlabel\n")
    with pytest.raises(SiloFileEmpty, match="header only"):
        load_silo(tsv_plugin / "head.tsv")

    # the unsupported-extension message lists the new extension
    other = tsv_plugin / "data.txt"
    other.write_text("hello")
    with pytest.raises(SiloFormatError) as info:
        load_silo(other)
    assert str(info.value) == (f"{other}: unsupported file extension '.txt'; "
                               f"supported: {', '.join(BUILT_IN)}, .tsv")


def test_once_removed_a_format_is_unsupported_again(tsv_plugin: Path) -> None:
    path = tsv_plugin / "news.tsv"
    path.write_bytes(_tsv_bytes())
    assert len(load_silo(path)) == len(ROWS)
    FORMATS.unregister("tsv")
    with pytest.raises(SiloFormatError) as info:
        load_silo(path)
    assert str(info.value) == f"{path}: unsupported file extension '.tsv'; supported: {', '.join(BUILT_IN)}"


def test_two_formats_claiming_one_extension_are_refused(clashing_plugin: Path) -> None:
    path = clashing_plugin / "data.csv"
    path.write_text("text,label\nhello,a\n")
    with pytest.raises(ValueError) as info:
        load_silo(path)
    message = str(info.value)
    assert not isinstance(info.value, SiloFormatError)  # the installation is wrong, not the operator's file
    assert "'csv' (clients.silo.formats.csv.Csv)" in message
    assert "'semicolon' (clients.silo.formats.semicolon.Semicolon)" in message
    assert "both claim the extension '.csv'" in message
    with pytest.raises(ValueError, match="both claim the extension '.csv'"):
        by_extension()
    # a file of another extension is refused too: which format reads what must not depend on import order
    json_path = clashing_plugin / "data.jsonl"
    json_path.write_text('{"text": "hello", "label": "a"}\n')
    with pytest.raises(ValueError, match="both claim"):
        load_silo(json_path)


@pytest.mark.parametrize("extensions, problem", [
    (".tsv", "must be a non-empty tuple"),   # a bare string, not a tuple
    ((), "must be a non-empty tuple"),
    ((".TSV",), "must be lower case"),
    (("tsv",), "start with '.'"),
    ((".tar.gz",), "no other '.'"),
])
def test_a_malformed_extension_is_refused(extensions: object, problem: str) -> None:
    before = FORMATS.names()

    class Bad(SiloFormat):
        @classmethod
        def read(cls, path: Path) -> RawTable:
            raise AssertionError("never read")

    Bad.extensions = extensions  # type: ignore[assignment]
    FORMATS.register("bad")(Bad)
    try:
        with pytest.raises(ValueError, match=f"silo format 'bad' .*{problem}"):
            by_extension()
    finally:
        FORMATS.unregister("bad")
    assert FORMATS.names() == before and clients.silo.SUPPORTED_EXTENSIONS == BUILT_IN


def test_a_format_without_read_is_refused() -> None:
    class NoRead(SiloFormat):
        extensions = (".x",)

    with pytest.raises(TypeError, match="abstract"):
        FORMATS.register("noread")(NoRead)
    assert "noread" not in FORMATS
