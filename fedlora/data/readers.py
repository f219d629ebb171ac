"""Data files and folders by form: every data file fedlora reads is opened here.

A form is a :class:`Reader` in :data:`READERS`, found by the end of a file's name or by the file
that marks a folder:

* ``.csv`` / ``.tsv``: a header line, then a row per line (every value is text; a UTF-8 byte-order
  mark, as spreadsheets write one, is dropped); a TSV file's quotes are text unless it quotes a
  cell whole (:func:`quoting`);
* ``.jsonl`` (or ``.json``): a JSON object per line, or one JSON array of objects (``alpaca_data.json``,
  ``datasets``' ``to_json(lines=False)``); ``.jsonl.gz`` (or ``.json.gz``): the same, gzip-compressed;
* ``.parquet``: a Parquet file (pyarrow); a ``ClassLabel`` column that ``datasets`` recorded in its
  metadata (its ``to_parquet``, the hub's files) gives its names, as a folder's does;
* a folder written by ``datasets``' ``save_to_disk``: a ``Dataset`` (``state.json``), or a
  ``DatasetDict`` (``dataset_dict.json``) of one split; a ``ClassLabel`` column gives its names
  (its ``-1``, no label, is null).

A name pattern (``shards/train-*.parquet``: ``*``, ``?`` or ``[...]`` in its last part) reads every
matching file in name order, all in one form. A hub dataset id, ``ORG/NAME`` or ``ORG/NAME:SPLIT``,
is its split's files in the local Hugging Face cache (:mod:`fedlora.data.hubdata`).

Every form gives the same rows, a dict per row keyed by column in the file's column order, so the
column rules of each task (:mod:`fedlora.data.loading`, :mod:`fedlora.data.instructions`,
:mod:`fedlora.data.choices`) hold for all of them alike. JSON, Parquet and ``datasets`` values keep
their types (a ``choices`` or ``messages`` list, an integer label); CSV and TSV values are text.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedlora.data.hubdata import locate_hub_dataset
from fedlora.errors import UserError, first_line, warn_once

Rows = list[dict]


@dataclass(frozen=True)
class Reader:
    """One form of data.

    Attributes
    ----------
    name : str
        The form, as messages name it.
    rows : callable
        ``path -> rows`` (a dict per row).
    suffixes : tuple of str
        Lower-case ends of the names of the files it reads (a file form).
    marker : str
        The file inside the folders it reads (a folder form).
    typed : bool
        Values keep their types (lists, numbers); False: every value is text.
    cells : callable or None
        ``path -> lines of cells``, every line as it is (a first line that may be data rather
        than a header: MMLU's CSV); None where the form has no such lines.
    """

    name: str
    rows: Callable[[Path], Rows]
    suffixes: tuple[str, ...] = ()
    marker: str = ""
    typed: bool = True
    cells: Callable[[Path], list[list[str]]] | None = None

    def reads(self, path: Path) -> bool:
        """Whether ``path`` is in this form."""
        if self.marker:
            return path.is_dir() and (path / self.marker).is_file()
        return path.is_file() and path.name.lower().endswith(self.suffixes)


#: The forms, by name, tried in order (:func:`register_reader` adds one).
READERS: dict[str, Reader] = {}


def register_reader(reader: Reader) -> Reader:
    """Add ``reader`` to :data:`READERS`."""
    READERS[reader.name] = reader
    return reader


#: CSV/TSV cells of any length (a long document), where the csv module stops at 131,072 characters;
#: capped for a C long on Windows.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

#: Separators a delimited file may use instead of its form's: a header of one column holding one
#: of them is refused (a semicolon-separated ``.csv``, as spreadsheets in some locales write one).
SEPARATORS = {",": "commas", "\t": "tabs", ";": "semicolons", "|": "bars"}


def quoting(path: Path, delimiter: str) -> int:
    """How ``path``'s cells are quoted: a CSV file's as the csv module reads them (``"..."`` around a
    cell that holds a comma, a quote doubled inside); a TSV file's the same where one of its cells is
    quoted whole as pandas' ``to_csv(sep="\\t")`` quotes a text that holds a quote (starts and ends with
    ``"``, every quote inside doubled), else not at all, as GLUE's TSVs are written: ``"great" movie``
    and ``"I love it," she said, "really."`` are those texts."""
    if delimiter != "\t":
        return csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8-sig") as fh:
        for line in fh:
            if any(_quoted_whole(c) for c in line.rstrip("\r\n").split("\t")):
                return csv.QUOTE_MINIMAL
    return csv.QUOTE_NONE


def _quoted_whole(cell: str) -> bool:
    """Whether ``cell`` is quoted as the csv module writes a quoted field: ``"`` around it, and every
    ``"`` inside doubled."""
    return len(cell) > 1 and cell[0] == cell[-1] == '"' and '"' not in cell[1:-1].replace('""', "")


def _delimited_rows(path: Path, delimiter: str) -> Rows:
    """The rows of a CSV or TSV file (quoted as :func:`quoting` says). A row with more or fewer fields
    than the header is refused (an unquoted delimiter in a text, a lost field) where it would shift or
    lose a value, and a quoted field that runs over several lines is reported, once, in a warning."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting(path, delimiter))
        header = next(reader, None)
        if header is None:
            return []
        header = [name.strip() for name in header]  # "text, label": the column is "label"
        _check_separator(path, header, delimiter)
        _check_unique(path, header)
        rows, merged, line = [], [], 1
        for cells in reader:
            first, line = line + 1, reader.line_num
            if not cells:
                continue
            if len(cells) != len(header):
                raise UserError(f"{path}:{line}: {len(cells)} fields where the header has {len(header)};"
                                f" quote a text that holds a {SEPARATORS[delimiter][:-1]}"
                                ' ("...") and give every row each column')
            if line > first:
                merged.append(first)
            rows.append(dict(zip(header, cells, strict=True)))
    if merged:
        warn_once(f"{path}:{merged[0]}: a quoted field runs over several lines, so those lines make one row"
                  f" ({len(merged)} such row(s)); if the quote is part of the text, double it or save the"
                  " file as .jsonl")
    return rows


def _check_separator(path: Path, header: list[str], delimiter: str) -> None:
    """Refuse a header of one column that another separator splits (``text;label`` in a .csv)."""
    if len(header) != 1:
        return
    other = next((sep for sep in SEPARATORS if sep != delimiter and sep in header[0]), None)
    if other is not None:
        raise UserError(f"{path}: its header {header[0]!r} is one column: its fields are separated by"
                        f" {SEPARATORS[other]}, and fedlora reads .csv files separated by commas and"
                        " .tsv files by tabs; re-save it so")


def _check_unique(path: Path, header: list[str]) -> None:
    """Refuse a header that names a column twice (``text,label,text``): one of them would be lost.
    Unnamed columns (a spreadsheet's trailing ``,,``) are not names."""
    twice = next((name for n, name in enumerate(header) if name and name in header[:n]), None)
    if twice is not None:
        first, second = [n + 1 for n, name in enumerate(header) if name == twice][:2]
        raise UserError(f"{path}: its header names the column {twice!r} twice (columns {first} and {second});"
                        " rename one, so each column has its own name")


def _delimited_cells(path: Path, delimiter: str) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return [r for r in csv.reader(fh, delimiter=delimiter, quoting=quoting(path, delimiter)) if r]


def _json(path: Path, opener: Callable = open) -> Rows:
    """JSON lines, or one JSON array of objects when the file starts with ``[``."""
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:
            head = fh.read(4096).lstrip()
            if not head.startswith("["):
                fh.seek(0)
                return _not_columns(path, _json_lines(path, fh))
            try:
                rows = json.loads(head + fh.read())
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{exc.lineno}: not a JSON array of objects ({exc.msg})") from None
    except (gzip.BadGzipFile, EOFError) as exc:
        raise UserError(f"{path}: not a gzip-compressed file ({first_line(exc)})") from None
    bad = next((n for n, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise UserError(f"{path}: item {bad} of the JSON array is a {type(rows[bad]).__name__}, not an"
                        " object (a row of named columns)")
    return rows


def _not_columns(path: Path, rows: Rows) -> Rows:
    """``rows``, unless they are one object of columns or of rows by index, as pandas' ``to_json``
    writes a frame by default (``orient='columns'``, ``'index'``, ``'split'``, ``'table'``).

    Raises
    ------
    UserError
        So it is (one line: how to write rows).
    """
    keys = set(rows[0]) if len(rows) == 1 else set()
    if keys and (all(isinstance(v, dict) for v in rows[0].values()) or {"columns", "data"} <= keys
                 or {"schema", "data"} <= keys):
        raise UserError(f"{path}: one JSON object of the whole table (as pandas' to_json writes it by"
                        " default), not a row per example: write rows, df.to_json(path, orient='records',"
                        " lines=True)")
    return rows


def _json_lines(path: Path, fh: IO[str]) -> Rows:
    rows = []
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not a JSON object per line ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: not a JSON object per line (a {type(row).__name__})")
        rows.append(row)
    return rows


def _parquet(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    return _class_names(table.to_pylist(), _parquet_class_labels(table.schema.metadata or {}))


def _parquet_class_labels(metadata: dict) -> dict[str, list[str]]:
    """``{column: label names}`` of the ``ClassLabel`` columns that ``datasets`` records in a Parquet
    file's schema metadata (its ``huggingface`` key: the files it writes, and the hub's Parquet
    files); {} for a file without them."""
    try:
        features = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {c: f["names"] for c, f in features.items() if isinstance(f, dict)
            and f.get("_type") == "ClassLabel" and isinstance(f.get("names"), list)}


class NamedRows(list):
    """Rows whose ``ClassLabel`` columns had names: ``class_names[column]`` lists them in their ids'
    order, which a classifier's label ids keep (:func:`fedlora.data.loading.load_file`)."""

    class_names: dict[str, list[str]]

    def __init__(self, rows, class_names: dict[str, list[str]]) -> None:
        super().__init__(rows)
        self.class_names = class_names


def _class_names(rows: Rows, named: dict[str, list[str]]) -> Rows:
    """``rows`` with each ``ClassLabel`` column's ids (``named``: its label names) as their names, and
    its ``-1`` (no label, as in GLUE's test splits) as None, as a missing label is; their names'
    order kept (:class:`NamedRows`)."""
    for row in rows:
        for column, names in named.items():
            value = row.get(column)
            if isinstance(value, int) and 0 <= value < len(names):
                row[column] = names[value]
            elif value == -1:
                row[column] = None
    return NamedRows(rows, dict(named)) if named else rows


def _dataset(path: Path) -> Rows:
    """A ``Dataset`` folder's rows, a ``ClassLabel`` column's ids as their names; its ``-1`` (no label,
    as in GLUE's test splits) is None, a missing label as a null in JSON lines is."""
    from datasets import ClassLabel, load_from_disk

    try:
        ds = load_from_disk(str(path))
        rows = ds.to_list()
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: not a readable datasets.save_to_disk folder ({first_line(exc)})") from None
    return _class_names(rows, {c: f.names for c, f in ds.features.items() if isinstance(f, ClassLabel)})


def _dataset_dict(path: Path) -> Rows:
    try:
        splits = list(json.loads((path / "dataset_dict.json").read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a readable datasets.save_to_disk folder ({first_line(exc)})") from None
    if len(splits) != 1:
        raise UserError(f"{path} is a DatasetDict of the splits {', '.join(splits)}: pass one split's"
                        f" folder, e.g. {path / splits[0]}")
    return _dataset(path / splits[0])


register_reader(Reader("CSV", functools.partial(_delimited_rows, delimiter=","), (".csv",), typed=False,
                       cells=functools.partial(_delimited_cells, delimiter=",")))
register_reader(Reader("TSV", functools.partial(_delimited_rows, delimiter="\t"), (".tsv",), typed=False))
register_reader(Reader("JSON lines", _json, (".jsonl", ".json")))
register_reader(Reader("gzip JSON lines", functools.partial(_json, opener=gzip.open),
                       (".jsonl.gz", ".json.gz")))
register_reader(Reader("Parquet", _parquet, (".parquet",)))
register_reader(Reader("datasets.save_to_disk folder", _dataset, marker="state.json"))
register_reader(Reader("datasets.save_to_disk DatasetDict folder", _dataset_dict, marker="dataset_dict.json"))


def forms() -> str:
    """The accepted forms, in one phrase (for messages)."""
    suffixes = [s for r in READERS.values() for s in r.suffixes]
    return (f"a {', '.join(suffixes[:-1])} or {suffixes[-1]} file, or a datasets.save_to_disk folder"
            if suffixes else "a datasets.save_to_disk folder")


def is_pattern(path: Path) -> bool:
    """Whether ``path`` names files by a pattern (``*``, ``?`` or ``[`` in its last part)."""
    return any(c in path.name for c in "*?[")


def locate(path: Path | str) -> Path:
    """``path``, or the cached files of the hub dataset id it is (:mod:`fedlora.data.hubdata`)."""
    suffixes = tuple(s for r in READERS.values() for s in r.suffixes)
    return locate_hub_dataset(str(path), suffixes) or Path(path)


def matching(pattern: Path) -> list[Path]:
    """The files a pattern (:func:`is_pattern`) matches, in name order; none may."""
    return sorted(p for p in pattern.parent.glob(pattern.name) if p.is_file())


def _matches(path: Path) -> list[Path]:
    found = matching(path)
    if not found:
        raise UserError(f"no data file matches {str(path)!r}")
    return found


def _each(read: Callable[[Path], list]) -> Callable[[Path], list]:
    """``read`` over every file a pattern matches, in name order, as one list (with the first file's
    ``ClassLabel`` names: a dataset's shards share them)."""
    def each(pattern: Path) -> list:
        parts = [read(f) for f in _matches(pattern)]
        rows = [item for part in parts for item in part]
        named = next((p.class_names for p in parts if isinstance(p, NamedRows)), None)
        return NamedRows(rows, named) if named else rows

    return each


def reader_for(path: Path) -> Reader:
    """The form of ``path`` (a located path: :func:`locate`); for a pattern, the form of the files it
    matches, reading them all in name order.

    Raises
    ------
    UserError
        ``path`` does not exist, is in no form of :data:`READERS`, or names files of several forms.
    """
    if is_pattern(path):
        files = _matches(path)
        kinds = {reader_for(f).name for f in files}
        if len(kinds) > 1:
            raise UserError(f"{str(path)!r} matches files of several forms ({', '.join(sorted(kinds))});"
                            " narrow the pattern")
        one = READERS[kinds.pop()]
        return Reader(f"{one.name} files", _each(one.rows), one.suffixes, typed=one.typed,
                      cells=one.cells and _each(one.cells))
    if not path.exists():
        raise UserError(f"data file {str(path)!r} not found")
    found = next((r for r in READERS.values() if r.reads(path)), None)
    if found is None:
        raise UserError(f"unsupported data {'folder' if path.is_dir() else 'file'} {str(path)!r}:"
                        f" use {forms()}")
    return found


def read_rows(path: Path | str) -> Rows:
    """The rows of ``path`` (a dict per row), in whichever form it is; a hub dataset id is located
    first.

    Raises
    ------
    UserError
        As :func:`reader_for`; or the file is not UTF-8 text, or not in its form.
    """
    path = locate(path)
    try:
        return reader_for(path).rows(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset"
                        f" {exc.start}); re-save it as UTF-8") from None
