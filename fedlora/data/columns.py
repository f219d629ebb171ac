"""``--columns``: a data file's own columns read under the names of the forms ``--task sft`` and
``--task dpo`` read (``prompt=problem,response=solution``), for datasets whose columns are named
otherwise (MATH, MetaMathQA, OpenBookQA's ``question_stem``, stack-exchange pairs). The choices of a
multiple-choice file may be several columns joined by ``+`` (PIQA's ``choices=sol1+sol2``), and so
may a prompt's text, then read as one text with a blank line between the columns' (RACE's
``question=article+question``, SocialIQA's ``question=context+question``)."""

from __future__ import annotations

from fedlora.data.cells import is_blank
from fedlora.data.readers import Rows
from fedlora.errors import UserError

#: The columns of the forms ``--task sft`` and ``dpo`` read by name (instruction, multiple-choice and
#: preference files), which ``--columns`` maps a file's own columns to.
FORM_COLUMNS = ("prompt", "response", "completion", "instruction", "input", "output", "context", "question",
                "answer", "choices", "messages", "conversations", "chosen", "rejected")


def parse_columns(text: str) -> dict[str, str]:
    """``--columns``' ``NAME=COLUMN,...`` as ``{form column: file column}`` ({} for '').

    Raises
    ------
    UserError
        A pair without ``=``, a name that is not one of :data:`FORM_COLUMNS`, or a name given twice.
    """
    out: dict[str, str] = {}
    for pair in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, column = (part.strip() for part in pair.partition("="))
        if not eq or not name or not column or ("+" in column and not all(column.split("+"))):
            raise UserError(f"--columns takes NAME=COLUMN pairs (e.g. prompt=problem,response=solution), got"
                            f" {pair!r}")
        if name not in FORM_COLUMNS or name in out:
            why = "is given twice" if name in out else f"is not a form's column ({', '.join(FORM_COLUMNS)})"
            raise UserError(f"--columns: {name!r} {why}")
        out[name] = column
    return out


def renamed(rows: Rows, columns: dict[str, str] | None, name: str) -> Rows:
    """``rows`` with each file column that ``columns`` (:func:`parse_columns`; None or {}: none) maps
    read under its form name; a column of the file that has a mapped form name itself is left out.
    Where ``choices`` joins columns, an answer that names one of them (COPA's ``ClassLabel`` names
    ``choice1``/``choice2``) is that choice's index.

    Raises
    ------
    UserError
        The file lacks a mapped column (one line listing its columns).
    """
    if not columns or not rows:
        return rows
    joins = {form: _joined(column, rows[0]) for form, column in columns.items()
             if form in ("choices", *TEXT_JOINS) and _joined(column, rows[0])}
    single = {form: column for form, column in columns.items() if form not in joins}
    parts = [c for cols in joins.values() for c in cols]
    missing = next((c for c in [*single.values(), *parts] if c not in rows[0]), None)
    if missing is not None:
        raise UserError(f"{name} has no column {missing!r} (--columns); its columns: {', '.join(rows[0])}")
    back = {column: form for form, column in single.items()}
    out = [{back.get(k, k): v for k, v in row.items() if (k in back or k not in columns) and k not in parts}
           for row in rows]
    for row, new in zip(rows, out, strict=True):
        for form, cols in joins.items():
            values = [row.get(c) for c in cols]  # a row without one: a missing choice, or no text of it
            text = "\n\n".join(str(v) for v in values if not is_blank(v))
            new[form] = values if form == "choices" else text
        chosen = joins.get("choices", [])
        if "answer" in columns and new.get("answer") in chosen:  # COPA's "choice2": that column's
            new["answer"] = chosen.index(new["answer"])
    return out


#: The form columns whose text may join several file columns (``question=context+question``).
TEXT_JOINS = ("prompt", "instruction", "input", "context", "question")


def _joined(column: str, first: dict) -> list[str]:
    """The columns a ``NAME=A+B+...`` mapping joins (none for a single column, or a column whose own
    name has a ``+``)."""
    if "+" not in column or column in first:
        return []
    return [c.strip() for c in column.split("+")]
