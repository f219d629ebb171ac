"""A data column that says which group each row belongs to (``--partition-column``).

Federated benchmarks split instruction data by a column of its own: Dolly's ``category``, a
conversation's user, a document's source. :func:`with_groups` reads that column of ``--data`` beside a
task's reader and puts each example's value in ``TextDataset.groups``; the partitions read it
(:func:`fedlora.data.loading.partition`): ``natural`` gives every value its own client, ``dirichlet``
and ``dirichlet-clients`` skew the clients' mixes of the values as they skew a classifier's labels.
A reader that skips rows (empty responses, identical preference pairs) keeps each example's row in
``TextDataset.source``, so every example gets its own row's value.
"""

from __future__ import annotations

from dataclasses import replace

from fedlora.data.cells import cell_text, is_blank
from fedlora.data.instructions import BBC_INSTRUCT
from fedlora.data.loading import DEFAULT_DATASET, TextDataset
from fedlora.data.readers import locate, read_rows
from fedlora.errors import UserError


def with_groups(ds: TextDataset, spec: str, column: str) -> TextDataset:
    """``ds`` (a task's examples of ``spec``, the ``--data`` value) with each example's value of
    ``column`` in ``groups``, as text without surrounding spaces.

    Raises
    ------
    UserError
        Built-in data, a column the file lacks, a row without a value, or examples that are not
        one per row of the file.
    """
    flag = f"--partition-column {column}"
    if spec in (DEFAULT_DATASET, BBC_INSTRUCT):
        raise UserError(f"{flag} reads a column of a data file, and --data {spec} is built in: pass a"
                        " file, or drop --partition-column")
    path = locate(spec)
    rows = read_rows(path)
    if not rows or column not in rows[0]:
        columns = ", ".join(rows[0]) if rows else "none"
        raise UserError(f"{flag}: {path.name} has no column {column!r} (columns: {columns}); name one of"
                        " its columns")
    where = ds.source if ds.source is not None else list(range(len(ds)))
    if (ds.source is None and len(ds) != len(rows)) or any(i >= len(rows) for i in where):
        raise UserError(f"{flag}: the examples of {path.name} are not one per row ({len(ds)} examples of"
                        f" {len(rows)} rows), so a row's {column!r} names no example's group; use"
                        " --partition iid, or dirichlet by the labels")
    missing = [i for i in where if is_blank(rows[i].get(column))]
    if missing:
        raise UserError(f"{len(missing)} row(s) of {path.name} have no {column!r} (null, NaN or empty; the"
                        f" first is data row {missing[0] + 1}), so {flag} puts them in no group: fill"
                        " them in, or drop those rows")
    values = [cell_text(rows[i], column, f"data row {i + 1} of {path.name}").strip() for i in where]
    return replace(ds, groups=values)
