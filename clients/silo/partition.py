"""Virtual organizations from the user's own data (``sim-data``, ``sim-partitioner``).

``sim-data`` is a silo file, split among the simulation's organizations by a
partitioner, or a folder of one silo file per organization (organization i
gets the i-th file in sorted name order; the partitioner is not used):

* ``iid`` — a seeded shuffle dealt into equal parts (sizes differ by at most one);
* ``dirichlet:ALPHA`` — label skew: for each label, proportions over the
  organizations drawn from Dirichlet(ALPHA, ..., ALPHA) (small ALPHA: each
  organization holds few labels; large: close to iid). Classification data only;
* ``by:COLUMN`` — one organization per distinct value of COLUMN (sorted; numbers
  numerically), so the data's own grouping (region, hospital, customer) is the
  federation's.

Every row goes to exactly one organization, the split depends only on the file,
the number of organizations, the partitioner and the seed, and an organization
without a row is an error (:class:`PartitionError`), never an empty silo.

A classification job that declares no ``task-labels`` gets the label set of the
whole data (every file of a folder), not of each part: every organization then
renders the same prompt, as the built-in corpora do (``virtual.py``).

Flower Datasets' partitioners (``flwr-datasets``) are not used: its 0.6.1 wheel
needs ``datasets<5`` and ``fsspec<=2026.2.0``, and installing it would downgrade
the ``huggingface_hub`` and ``fsspec`` that transformers and torch run on here.
The three partitioners are small enough to write with numpy.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from protos.task_spec import TaskSpec

from .build import _as_label
from .files import read_silo_table, silo_from_table
from .formats import RawTable, by_extension, directory_formats
from .records import Silo

#: what ``sim-partitioner`` accepts, for messages and help
PARTITIONERS = ("iid", "dirichlet:ALPHA", "by:COLUMN")

#: Dirichlet proportions are drawn again (same seeded generator) while some
#: organization would get no row, at most this many times (Flower Datasets' retry, with min size 1)
DIRICHLET_DRAWS = 10

__all__ = ["PARTITIONERS", "PartitionError", "Partitioner", "is_silo_folder", "organizations_in",
           "parse_partitioner", "partition_silo", "partition_silos"]


class PartitionError(ValueError):
    """The data cannot be split into the simulation's organizations as asked (the message says why)."""


@dataclass(frozen=True)
class Partitioner:
    """A parsed ``sim-partitioner``: ``kind`` is iid, dirichlet or by."""

    kind: str
    alpha: float = 0.0
    column: str = ""

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "by":
            return f"by:{self.column}"
        return self.kind


def parse_partitioner(text: str) -> Partitioner:
    """``iid``, ``dirichlet:ALPHA`` (ALPHA > 0) or ``by:COLUMN``; PartitionError otherwise."""
    kind, sep, arg = str(text).strip().partition(":")
    kind = kind.strip().lower()
    if kind == "iid" and not sep:
        return Partitioner("iid")
    if kind == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if not math.isfinite(alpha) or alpha <= 0:
            raise PartitionError(f"sim-partitioner {text!r}: ALPHA must be a positive number, e.g. dirichlet:0.5")
        return Partitioner("dirichlet", alpha=alpha)
    if kind == "by" and arg.strip():
        return Partitioner("by", column=arg.strip())
    raise PartitionError(f"sim-partitioner {text!r}: expected one of {', '.join(PARTITIONERS)}")


def is_silo_folder(path: str | os.PathLike[str]) -> bool:
    """A folder of one silo file per organization: a folder that no silo format reads itself
    (a Hugging Face ``datasets`` folder is one silo, read by the arrow format)."""
    folder = Path(path)
    return folder.is_dir() and not any(fmt.reads_directory(folder) for fmt in directory_formats())


def organizations_in(path: str | os.PathLike[str], partitioner: str = "iid") -> int | None:
    """How many organizations the data itself defines: a folder's silo files, or by:COLUMN's distinct
    values; None when any number will do (iid, dirichlet)."""
    if is_silo_folder(path):
        return len(_silo_files(Path(path)))
    how = parse_partitioner(partitioner)
    if how.kind != "by":
        return None
    table = read_silo_table(path)
    if how.column not in table.columns:
        return None  # the split itself names the missing column
    return len({_as_label(value) for value in table.column(how.column)} - {None})


def partition_silo(path: str | os.PathLike[str], partition_id: int, num_partitions: int,
                   partitioner: str = "iid", *, seed: int = 0, spec: TaskSpec | None = None) -> Silo:
    """The silo of virtual organization ``partition_id`` of ``num_partitions``, cut from ``path``.

    The file (or folder) is read and split once per process; the other
    organizations an actor serves reuse that work.
    """
    _check_partition(partition_id, num_partitions)
    return _plan_for(path, num_partitions, partitioner, seed, spec).silo(partition_id)


def partition_silos(path: str | os.PathLike[str], num_partitions: int, partitioner: str = "iid", *,
                    seed: int = 0, spec: TaskSpec | None = None) -> list[Silo]:
    """Every organization's silo, in order: what ``silotune simulate`` checks before Ray starts."""
    _check_partition(0, num_partitions)
    plan = _plan_for(path, num_partitions, partitioner, seed, spec)
    return [plan.silo(i) for i in range(num_partitions)]


def _check_partition(partition_id: int, num_partitions: int) -> None:
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive int, got {num_partitions!r}")
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) \
            or not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id!r}")


def _plan_for(path: str | os.PathLike[str], num_partitions: int, partitioner: str, seed: int,
              spec: TaskSpec | None) -> "_Plan":
    source = os.fspath(path)
    spec = spec or TaskSpec()
    if is_silo_folder(source):
        return _folder_plan(source, _stamp(source), num_partitions, spec)
    return _file_plan(source, _stamp(source), num_partitions, str(parse_partitioner(partitioner)), int(seed), spec)


def _stamp(source: str) -> tuple[object, ...]:
    """Changes when the data changes, so a rewritten file is read again (the plans are cached)."""
    path = Path(source)
    try:
        entries = sorted(path.iterdir()) if path.is_dir() else [path]
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in entries)
    except OSError:
        return ()  # missing: read_silo_table raises the named SiloError


@dataclass(frozen=True)
class _Plan:
    """Which rows (or which file) each organization gets, and the spec they all render with."""

    tables: tuple[RawTable, ...]  # one table (a split file) or one per organization (a folder)
    sources: tuple[str, ...]
    rows: tuple[tuple[int, ...], ...] | None  # per organization; None: the whole table of its file
    spec: TaskSpec

    def silo(self, partition_id: int) -> Silo:
        if self.rows is None:
            return silo_from_table(self.tables[partition_id], self.sources[partition_id], spec=self.spec)
        num = len(self.rows)
        return silo_from_table(_subtable(self.tables[0], self.rows[partition_id]),
                               f"{self.sources[0]} (org-{partition_id} of {num})", spec=self.spec)


@functools.lru_cache(maxsize=4)
def _file_plan(source: str, stamp: tuple[object, ...], num_partitions: int, partitioner: str, seed: int,
               spec: TaskSpec) -> _Plan:
    table = _memoized(read_silo_table(source))
    whole = silo_from_table(table, source, spec=spec)  # the whole file's errors, with its own row numbers
    how = parse_partitioner(partitioner)
    if how.kind == "iid":
        rows = _iid(table.num_rows, num_partitions, seed)
    elif how.kind == "dirichlet":
        if whole.task != "classification":
            raise PartitionError(f"{source}: sim-partitioner {partitioner!r}: dirichlet needs a label column, and "
                                 f"this is {whole.task} data; use iid or by:COLUMN")
        labels = [_as_label(value) for value in table.column("label")]
        rows = _dirichlet(labels, num_partitions, how.alpha, seed, source, partitioner)
    else:
        rows = _by_column(table, how.column, num_partitions, source)
    for org, part in enumerate(rows):
        if not part:
            raise PartitionError(f"{source}: sim-partitioner {partitioner!r} gives organization org-{org} "
                                 f"(of {num_partitions}) no rows: {table.num_rows} rows cannot give every "
                                 "organization one; use fewer organizations or more rows")
    return _Plan((table,), (source,), tuple(tuple(sorted(part)) for part in rows), _whole_data_spec([whole], spec))


@functools.lru_cache(maxsize=4)
def _folder_plan(source: str, stamp: tuple[object, ...], num_partitions: int, spec: TaskSpec) -> _Plan:
    files = _silo_files(Path(source))
    if not files:
        raise PartitionError(f"{source}: a folder of one silo file per organization, but it holds no silo file "
                             f"(extensions read: {', '.join(by_extension())})")
    if len(files) != num_partitions:
        listed = ", ".join(p.name for p in files[:8]) + (", ..." if len(files) > 8 else "")
        raise PartitionError(f"{source}: a folder of one silo file per organization holds {len(files)} silo "
                             f"files ({listed}) but the simulation has {num_partitions} organizations; "
                             f"run with --organizations {len(files)}")
    tables = tuple(_memoized(read_silo_table(f)) for f in files)
    wholes = [silo_from_table(t, os.fspath(f), spec=spec) for t, f in zip(tables, files)]
    return _Plan(tables, tuple(map(os.fspath, files)), None, _whole_data_spec(wholes, spec))


def _silo_files(folder: Path) -> list[Path]:
    """The folder's silos in sorted name order: files of a registered extension and ``datasets`` folders."""
    extensions = by_extension()
    return [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")
            and ((p.is_file() and p.suffix.lower() in extensions) or (p.is_dir() and not is_silo_folder(p)))]


def _whole_data_spec(wholes: list[Silo], spec: TaskSpec) -> TaskSpec:
    """The spec every organization renders with: a classification job without labels gets the whole data's."""
    tasks = sorted({silo.task for silo in wholes})
    if len(tasks) > 1:
        kinds = ", ".join(f"{Path(silo.source).name}: {silo.task}" for silo in wholes)
        raise PartitionError(f"the organizations' files hold different tasks ({kinds}); one simulation "
                             "trains one task")
    if tasks == ["classification"] and not spec.labels:
        return replace(spec, labels=tuple(sorted({label for silo in wholes for label in silo.labels})))
    return spec


def _memoized(table: RawTable) -> RawTable:
    """The same table, each column materialised once: every organization's rows are cut from it."""
    return RawTable(table.columns, table.num_rows, functools.cache(table.column))


def _subtable(table: RawTable, rows: tuple[int, ...]) -> RawTable:
    """Those rows of ``table``, in file order; a column is cut only when the layout asks for it
    (so big unrelated columns of a Parquet file are never copied per organization)."""

    def column(name: str) -> list[object]:
        values = table.column(name)
        return [values[i] for i in rows]

    return RawTable(table.columns, len(rows), column)


def _iid(num_rows: int, num_partitions: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(num_rows)
    return [part.tolist() for part in np.array_split(order, num_partitions)]


def _dirichlet(labels: list[str | None], num_partitions: int, alpha: float, seed: int, source: str,
               partitioner: str) -> list[list[int]]:
    """Per label, Dirichlet(alpha) proportions over the organizations; every row dealt to one of them.

    Rows without a usable label (dropped later when the silo is built) form a
    group of their own so that they, too, land in exactly one organization.
    """
    groups: dict[str | None, list[int]] = {}
    for row, label in enumerate(labels):
        groups.setdefault(label, []).append(row)
    order = sorted(groups, key=lambda label: (label is None, label or ""))
    rng = np.random.default_rng(seed)
    for _ in range(DIRICHLET_DRAWS):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for label in order:
            members = rng.permutation(np.array(groups[label], dtype=np.int64))
            counts = _apportion(len(members), rng.dirichlet(np.full(num_partitions, alpha)))
            starts = np.concatenate(([0], np.cumsum(counts)))
            for org in range(num_partitions):
                parts[org].extend(members[starts[org]:starts[org + 1]].tolist())
        if all(parts):
            return parts
    empty = next(org for org, part in enumerate(parts) if not part)
    raise PartitionError(f"{source}: sim-partitioner {partitioner!r} left organization org-{empty} (of "
                         f"{num_partitions}) without rows in {DIRICHLET_DRAWS} draws of the label proportions; "
                         "use a larger ALPHA, fewer organizations or more rows")


def _apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """``total`` split by ``shares`` (summing to 1) into integers: floors, then the largest remainders."""
    exact = total * shares
    counts = np.floor(exact).astype(np.int64)
    for org in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[org] += 1
    return counts


def _by_column(table: RawTable, column: str, num_partitions: int, source: str) -> list[list[int]]:
    if column not in table.columns:
        raise PartitionError(f"{source}: sim-partitioner 'by:{column}': no column {column!r}; columns: "
                             f"{', '.join(map(repr, table.columns))}")
    values = [_as_label(value) for value in table.column(column)]
    missing = [row + 1 for row, value in enumerate(values) if value is None]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise PartitionError(f"{source}: sim-partitioner 'by:{column}': {len(missing)} row(s) have no text or "
                             f"integer value in {column!r} (rows {shown}), so they belong to no organization")
    distinct = sorted(set(values), key=_value_order)
    if len(distinct) != num_partitions:
        shown = ", ".join(map(repr, distinct[:8])) + (", ..." if len(distinct) > 8 else "")
        raise PartitionError(f"{source}: sim-partitioner 'by:{column}' gives one organization per value: "
                             f"{len(distinct)} values ({shown}) but the simulation has {num_partitions} "
                             f"organizations; run with --organizations {len(distinct)}")
    org_of = {value: org for org, value in enumerate(distinct)}
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for row, value in enumerate(values):
        parts[org_of[value]].append(row)
    return parts


def _value_order(value: str | None) -> tuple[int, float, str]:
    """Numbers in numeric order (2 before 10), then text in code-point order."""
    try:
        number = float(value or "")
    except ValueError:
        return (1, 0.0, value or "")
    return (0, number, value or "") if math.isfinite(number) else (1, 0.0, value or "")
