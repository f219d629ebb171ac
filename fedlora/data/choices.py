"""Multiple-choice files: a question, its choices, and which choice is the answer.

Two forms are read (``--prompt-template`` then puts the question in its ``{text}`` slot):

1. rows with ``question``, ``choices`` (a list of at least two different answers) and ``answer``:
   the right choice's index (from 0; ``3.0`` is ``3``), its letter (``A`` for the first) or else its
   text, in any form whose values
   keep their types (``.jsonl``, ``.jsonl.gz``, ``.parquet``, a ``datasets.save_to_disk``
   folder: :mod:`fedlora.data.readers`). The benchmarks' own columns (:data:`FORMS`) read the
   same: ARC's and CommonsenseQA's ``choices`` of ``{"text", "label"}`` lists with ``answerKey``,
   OpenBookQA's ``question_stem``, HellaSwag's ``ctx``/``endings``/``label``, MedQA's ``options``
   (``{"A": text, …}``) with ``answer_idx``; an answer may also be one of the choices' labels;
2. MMLU's CSV: ``question,A,B,C,D,answer`` per row (any number of lettered choice columns),
   with or without that header line; ``answer`` is a letter (or an index).

Where every choice of a row is a number (``["1", "2", "3", "4"]``), an answer given as text that
equals one of them is that choice, not an index (``"2"`` is the choice ``2``); give an index as a
JSON number there, or a letter. Indices count from 0, except in a file whose answers are all
numbers, never 0 and sometimes their row's number of choices (SocialIQA, Winogrande): it counts from
1, and is read so, said once.

A labeled file with ``--label-words`` is multiple choice too, its words being the choices
(:func:`fedlora.data.instructions.from_labeled`). The rows become a ``TextDataset`` whose
``texts`` are the questions, ``choices`` the choices, ``labels`` the answers' indices and
``responses`` the answers' texts (what ``--task sft`` trains on).
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from fedlora.data.cells import text_of
from fedlora.data.columns import renamed
from fedlora.data.loading import TextDataset
from fedlora.data.readers import reader_for
from fedlora.errors import UserError, warn_once

LETTERS = string.ascii_uppercase
#: The (question, choices, answer) columns of a multiple-choice row, in the order they are tried:
#: fedlora's own, then the benchmarks' as they ship (ARC/CommonsenseQA, OpenBookQA, HellaSwag, MedQA).
FORMS: tuple[tuple[str, str, str], ...] = (
    ("question", "choices", "answer"), ("question", "choices", "answerKey"),
    ("question_stem", "choices", "answerKey"), ("ctx", "endings", "label"),
    ("question", "options", "answer_idx"))


#: A choice's text that is a number (its answer, as text, names the choice rather than an index).
NUMBER = re.compile(r"-?\d+(\.\d+)?")


def answer_index(value, n: int, where: str) -> int:
    """The index of ``value`` (an index from 0 or a letter) among ``n`` choices.

    Raises
    ------
    UserError
        ``value`` is neither, or names no choice of the ``n``.
    """
    index = _raw_index(value)
    if not 0 <= index < n:
        raise UserError(_outside(value, n, where))
    return index


def _raw_index(value) -> int:
    """``value`` as an index (an integer, an integral float as pandas writes a nullable integer column:
    ``3.0``, its ASCII digits, or a letter: ``A`` is 0), else -1."""
    text = str(value).strip()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) or text.isascii() and text.isdigit():
        return int(text)
    if len(text) == 1 and text.upper() in LETTERS:
        return LETTERS.index(text.upper())
    return -1


def _outside(value, n: int, where: str) -> str:
    return (f"{where}: answer {value!r} is not among its {n} choices; give the right"
            f" choice's index (0-{n - 1}) or letter (A-{LETTERS[n - 1]})")


def _listed(choices) -> tuple[object, list[str]]:
    """``(the choices as a list, their labels)``: a list as it is (no labels), ARC's ``{"text": [...],
    "label": [...]}``, or MedQA's ``{"A": text, ...}`` (labels: its keys)."""
    if isinstance(choices, dict) and isinstance(choices.get("text"), list):
        return choices["text"], [str(v) for v in choices.get("label") or []]
    if isinstance(choices, dict) and choices and all(isinstance(v, str) for v in choices.values()):
        return list(choices.values()), [str(k) for k in choices]
    return choices, []


def _row(question, choices, answer, where: str, typed: bool = True) -> tuple[str, list[str], int]:
    """``(question, choices, the answer's index)``: one of the choices' labels, the choice of that text
    where every choice is a number, an index or a letter, else the choice of that text; an index
    outside the choices is kept (-1 for none of these) for :func:`_checked` to refuse. Not ``typed``
    (a CSV, whose cells are all text): a number is always an index, as in every other row."""
    choices, labels = _listed(choices)
    if not isinstance(choices, list) or len(choices) < 2 or len(choices) > len(LETTERS):
        raise UserError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} answers,"
                        f" got {choices!r}")
    texts = [text_of(c, where, f"choice {i}").strip() for i, c in enumerate(choices, 1)]
    if not all(texts):
        raise UserError(f"{where}: choice {texts.index('') + 1} is empty; every choice needs a text")
    question = text_of(question, where, "question")
    said = text_of(answer, where, "answer").strip()
    if said in labels:
        return question, texts, labels.index(said)
    at = texts.index(said) if said in texts else -1      # the choice of that text, if any
    numbers = at >= 0 and all(NUMBER.fullmatch(t) for t in texts)
    if typed and isinstance(answer, str) and numbers:
        return question, texts, at                       # numbers as choices: the (JSON) text names one
    index = _raw_index(answer)
    if not typed and numbers and index != at:            # a CSV cell: index or the choice's text?
        raise UserError(f"{where}: answer {said!r} could be index {index} or the choice {said!r} (index"
                        f" {at}), and a CSV cell cannot say which: give the answer as a letter"
                        f" ({LETTERS[0]}-{LETTERS[len(texts) - 1]})")
    if not 0 <= index < len(texts) and at >= 0 and (typed or not NUMBER.fullmatch(said)):
        return question, texts, at                       # the right choice's own text
    return question, texts, index


def _checked(rows: list[tuple[str, list[str], int]], answers: list, wheres: list[str], name: str
             ) -> list[tuple[str, list[str], int]]:
    """``rows`` whose answers are all among their choices. A file whose answers are all numbers, not
    all one, none 0 and some its row's number of choices (SocialIQA's ``1``-``3``, Winogrande's
    ``1``/``2``) counts from 1, which no 0-based reading fits: its answers are read shifted, said once.

    Raises
    ------
    UserError
        An answer outside its choices (a file that is not 1-based either).
    """
    bad = next((i for i, (_, c, y) in enumerate(rows) if not 0 <= y < len(c)), None)
    if bad is None:
        return rows
    numbers = all(_is_number(a) and _raw_index(a) == y for a, (_, _, y) in zip(answers, rows, strict=True))
    if numbers and all(1 <= y <= len(c) for _, c, y in rows) and len({y for _, _, y in rows}) > 1:
        warn_once(f"{name}: its answers count from 1 (none is 0, and some are their row's number of"
                  " choices), so answer 1 is read as the first choice")
        return [(q, c, y - 1) for q, c, y in rows]
    raise UserError(_outside(answers[bad], len(rows[bad][1]), wheres[bad]))


def _is_number(value) -> bool:
    """Whether an answer is written as a number (an integer, an integral float, ASCII digits), not a
    letter or a choice's text."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return float(value).is_integer()
    text = str(value).strip()
    return text.isascii() and text.isdigit()


def _dataset(rows: list[tuple[str, list[str], int]]) -> TextDataset:
    widest = max(len(c) for _, c, _ in rows)
    return TextDataset([q for q, _, _ in rows], [y for _, _, y in rows], list(LETTERS[:widest]),
                       [c[y] for _, c, y in rows], [c for _, c, _ in rows])


def _mmlu_start(first: list[str]) -> int | None:
    """How many header lines an MMLU-shaped CSV has (0 or 1), None when it is not one."""
    cells = [c.strip() for c in first]
    if len(cells) < 4:
        return None
    middle = [c.upper() for c in cells[1:-1]]
    lettered = middle == list(LETTERS[:len(middle)])
    if cells[0].lower() == "question" and cells[-1].lower() == "answer" and lettered:
        return 1
    last = cells[-1].upper()
    return 0 if len(last) == 1 and last in LETTERS[:len(cells) - 2] else None


def read_choice_file(path: Path, columns: dict[str, str] | None = None) -> TextDataset | None:
    """The rows of a multiple-choice file (see the module docstring), or None when ``path`` is in
    neither form; ``columns``: ``--columns`` (:func:`~fedlora.data.columns.renamed`; not for MMLU's
    CSV, whose columns are by position).

    Raises
    ------
    UserError
        A row without a list of choices, with an empty choice, or whose answer is outside them (a
        choice given twice is kept: ``--eval mc`` counts the right text, whichever copy scores best).
    """
    reader = reader_for(path)
    if reader.typed:
        rows = renamed(reader.rows(path), columns, path.name)
        form = next((f for f in FORMS if rows and set(f) <= set(rows[0])), None)
        if form is None:
            return None
        ask, options, answer = form
        wheres = [f"{path.name} row {n}" for n in range(1, len(rows) + 1)]
        read = [_row(r.get(ask), r.get(options), r.get(answer), w) for r, w in zip(rows, wheres, strict=True)]
        return _dataset(_checked(read, [r.get(answer) for r in rows], wheres, path.name))
    if reader.cells is None:
        return None
    lines = reader.cells(path)
    start = _mmlu_start(lines[0]) if lines else None
    if start is None:
        return None
    width = len(lines[0])
    out, wheres = [], []
    for n, cells in enumerate(lines[start:], start + 1):
        wheres.append(f"{path.name} line {n}")
        if len(cells) != width:
            raise UserError(f"{wheres[-1]} has {len(cells)} fields, not {width} (question, the choices,"
                            " answer) like the first line; quote fields that contain commas")
        out.append(_row(cells[0], cells[1:-1], cells[-1], wheres[-1], typed=False))
    if not out:
        raise UserError(f"{path.name} has a header but no questions")
    return _dataset(_checked(out, [c[-1] for c in lines[start:]], wheres, path.name))
