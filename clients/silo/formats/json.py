"""json: one JSON document holding the rows, each an object whose keys are columns.

Accepted shapes:

* a top-level array of objects: ``[{"text": ..., "label": ...}, ...]``
  (``pandas.DataFrame.to_json(orient="records")``, most exports);
* an object whose only member is ``"data"``, an array of objects:
  ``{"data": [...]}`` (a common wrapper); any other object is refused, naming
  its keys, rather than guessing which member holds the rows;
* JSON Lines saved as ``.json`` (one object per line, as Hugging Face
  ``Dataset.to_json`` writes by default): read as ``.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

from clients.silo.errors import SiloFileEmpty, SiloFormatError
from clients.silo.formats import RawTable, SiloFormat, add_record, decode_utf8, register_format, table_from_columns


@register_format("json")
class Json(SiloFormat):
    extensions = (".json",)
    list_order = 15

    @classmethod
    def read(cls, path: Path) -> RawTable:
        """An array of objects, ``{"data": [...]}``, or JSON Lines; see the module docstring."""
        text = decode_utf8(path.read_bytes(), path)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data" and text.lstrip().startswith("{"):
                from clients.silo.formats.jsonl import Jsonl  # one object per line: JSON Lines

                return Jsonl.read(path)
            raise SiloFormatError(
                f"{path}: line {exc.lineno}, column {exc.colno}: malformed JSON ({exc.msg})"
            ) from None
        if isinstance(document, dict):
            if set(document) != {"data"}:
                raise SiloFormatError(
                    f"{path}: expected a JSON array of objects (or {{\"data\": [...]}}), got an object "
                    f"with keys {', '.join(map(repr, list(document)[:10])) or 'none'} (one record? put it in an "
                    "array: [{...}])"
                )
            document = document["data"]
        if not isinstance(document, list):
            raise SiloFormatError(f"{path}: expected a JSON array of objects, got {type(document).__name__}")
        if not document:
            raise SiloFileEmpty(f"{path}: no data rows (an empty JSON array)")
        columns: dict[str, list[object]] = {}
        for index, obj in enumerate(document):
            if not isinstance(obj, dict):
                raise SiloFormatError(
                    f"{path}: array element {index + 1}: expected a JSON object, got {type(obj).__name__}"
                )
            add_record(columns, obj, index)
        return table_from_columns(columns, len(document))
