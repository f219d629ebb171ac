"""A labeled file's label column, as fedlora reads it: class names numbered into ids
(:func:`class_labels`, a classifier's), or numbers (:func:`score_targets`, ``--task regression``'s
scores); rows without one, and scores given as classes, are refused in one line."""

from __future__ import annotations

import re
from pathlib import Path

from fedlora.data.cells import cell_text, is_blank
from fedlora.errors import UserError, warn_once

#: A label that is a number, in ASCII digits (``³`` and ``①`` are digits to ``str.isdigit`` but text here).
NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]*)?")
#: The label of a row without one in SNLI's and MultiNLI's own files (``gold_label``: the annotators did
#: not agree), which is no class (unless ``+`` is a label too: polarity).
NO_LABEL = "-"
#: A label that is an integer.
INTEGER = re.compile(r"-?[0-9]+")
#: A regression target: a decimal number in ASCII digits, with an exponent or not (no ``nan``, ``inf``
#: nor ``1_000``, which Python's ``float`` reads).
SCORE = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
#: The largest score a float32 target holds (``torch.finfo(torch.float32).max``); one above is infinite.
FLOAT32_MAX = 3.4028234663852886e38


def class_labels(rows: list[dict], column: str, path: Path) -> tuple[list[int], list[str]]:
    """Each row's label id, and the label names: a ``ClassLabel`` column's in its ids' order (every
    name, so the ids are the dataset's), else in sorted order (numerically when every label is an
    integer). A label is its text without surrounding spaces; ``1.0`` is ``1``."""
    raw = label_cells(rows, column, path)
    named = getattr(rows, "class_names", {}).get(column)   # a ClassLabel's names: its ids' order
    if named and set(raw) <= set(named):
        return [named.index(v) for v in raw], list(named)
    if all(NUMBER.fullmatch(v) for v in raw):
        raw = [_integer(v) for v in raw]
        _refuse_scores(raw, column, path)
    names = label_order(raw)
    _warn_case(names, path)
    index = {v: i for i, v in enumerate(names)}
    return [index[v] for v in raw], names


def label_cells(rows: list[dict], column: str, path: Path) -> list[str]:
    """Each row's ``column`` as text without surrounding spaces.

    Raises
    ------
    UserError
        Rows without one (null, NaN, empty, ``-`` where ``+`` is no label, a ``ClassLabel``'s -1),
        counted, in one line.
    """
    given = [v.strip() if isinstance(v, str) else v for v in (r.get(column) for r in rows)]  # " -" is "-"
    dash = "+" not in given  # "+" and "-": polarity labels, "-" a class
    missing = [i for i, v in enumerate(given) if is_blank(v) or dash and v == NO_LABEL]
    if missing:
        raise UserError(f"{len(missing)} row(s) of {path.name} have no {column!r} (unlabelled: null, NaN,"
                        f" empty, '{NO_LABEL}' or a ClassLabel's -1; the first is data row {missing[0] + 1}):"
                        " fill in their labels or drop those rows")
    return [cell_text(r, column, f"data row {i + 1} of {path.name}").strip() for i, r in enumerate(rows)]


def score_targets(rows: list[dict], column: str, path: Path) -> list[float]:
    """Each row's ``column`` as a number (:data:`SCORE`: ``3.8``, ``-1``, ``2e-1``), the targets of
    ``--task regression``.

    Raises
    ------
    UserError
        Rows without one (:func:`label_cells`), or whose value is not a finite number as the model's
        float32 targets hold it (``1e39`` overflows): one line counting them, with the first.
    """
    raw = label_cells(rows, column, path)
    bad = [i for i, v in enumerate(raw) if not SCORE.fullmatch(v) or not abs(float(v)) <= FLOAT32_MAX]
    if bad:
        raise UserError(f"{len(bad)} row(s) of {path.name} have a {column!r} that is not a number (the first"
                        f" is data row {bad[0] + 1}: {raw[bad[0]][:40]!r}): --task regression fits numeric"
                        " targets (STS-B's 0-5 similarity); fix those rows or drop them, or pass --task"
                        " classification for classes")
    return [float(v) for v in raw]


def _refuse_scores(labels: list[str], column: str, path: Path) -> None:
    """Refuse numeric labels (:func:`_integer`'s) of which some have a fraction: a regression target
    (STS-B's similarity score, 0 to 5), not classes; each distinct score would be a class of its own.

    Raises
    ------
    UserError
        So they are (one line).
    """
    scores = sorted({v for v in labels if not INTEGER.fullmatch(v)}, key=float)
    if scores:
        shown = ", ".join(scores[:3]) + (", ..." if len(scores) > 3 else "")
        raise UserError(f"{column!r} of {path.name} holds scores with fractions ({shown}; {len(set(labels))}"
                        " distinct values): a regression target, as STS-B's similarity is, which"
                        " --task regression fits (classes would each be one score); or give classes,"
                        " e.g. scores binned into a label column of your own")


def _integer(label: str) -> str:
    """A :data:`NUMBER` label as an integer's digits where it is one (``1.0`` is ``1``, exactly for any
    number of digits: ``12345678901234567`` stays apart from ``12345678901234568``), else as it is."""
    whole, _, fraction = label.partition(".")
    return label if fraction.strip("0") else str(int(whole))


def label_order(names) -> list[str]:
    """Label names in the order labels get their ids: by value when they are all integers (ASCII
    digits), else by text (a labeled file's, and the choices of label-word questions)."""
    names = set(names)
    numeric = all(INTEGER.fullmatch(n) for n in names)
    return sorted(names, key=int) if numeric else sorted(names)


def _warn_case(names: list[str], path: Path) -> None:
    """One warning when labels differ only in case (``pos``, ``Pos``): they stay separate classes."""
    seen: dict[str, str] = {}
    for name in names:
        if name.lower() in seen:
            warn_once(f"labels {seen[name.lower()]!r} and {name!r} of {path.name} differ only in case, so"
                      " they are separate classes; write one spelling if they are one")
            return
        seen[name.lower()] = name
