"""A data file's cells as fedlora reads them, whatever its form (:mod:`fedlora.data.readers`): a
missing value (null, NaN), a blank one, and a text cell's text, refused in one line where a list, an
object or a missing value would have been trained on as text."""

from __future__ import annotations

import math

from fedlora.errors import UserError


def is_missing(value) -> bool:
    """Whether a cell holds no value: null, or a float NaN or infinity (JSON's ``NaN``, as Python's
    ``json.dumps`` writes a missing number, and pandas' missing values)."""
    return value is None or isinstance(value, float) and not math.isfinite(value)


def is_blank(value) -> bool:
    """Whether a cell gives no value: :func:`is_missing`, or text of spaces only."""
    return is_missing(value) or str(value).strip() == ""


def text_of(value, where: str, column: str) -> str:
    """A text cell's value: a string as it is, a number (or a boolean) as it is written.

    Raises
    ------
    UserError
        ``value`` is missing (:func:`is_missing`), a list or an object, whose Python text would be
        trained on (``where`` names the row in the message: ``"train.jsonl row 7"``).
    """
    if isinstance(value, str):
        return value
    if is_missing(value):
        said = "null" if value is None else f"{value} (a missing value)"
        raise UserError(f"{where}: {column!r} is {said}; give it a text, or drop the row")
    if isinstance(value, int | float):
        return str(value)
    raise UserError(f"{where}: {column!r} is a {type(value).__name__} ({str(value)[:60]!r}), not text;"
                    " give it as a string, or drop the row")


def cell_text(row: dict, column: str, where: str) -> str:
    """:func:`text_of` the value in ``row``'s ``column``.

    Raises
    ------
    UserError
        The row lacks the column, or :func:`text_of` refuses its value.
    """
    if column not in row:
        raise UserError(f"{where} has no {column!r}: give every row each column")
    return text_of(row[column], where, column)
