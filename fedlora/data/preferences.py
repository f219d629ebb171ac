"""Preference pairs for ``--task dpo``: a prompt, the response to prefer and the one to avoid.

A file is read in the first form its columns fit:

1. chat: ``chosen`` and ``rejected`` lists of ``{"role", "content"}`` messages (hh-rlhf and
   UltraFeedback style) whose last message is the assistant's response; the earlier ones, the
   same in both, are the prompt. Where the lists hold the assistant's answer alone (TRL's
   explicit-prompt form), the ``prompt`` column (a message list, or text: the user's turn) comes
   before it; otherwise a ``prompt`` column beside them is ignored. hh-rlhf's raw transcripts
   (text of ``\n\nHuman: …\n\nAssistant: …`` turns) are read as such lists. A message list is a real
   list, as :func:`fedlora.data.instructions.listed` says: other text (``"[0, 1, 2]"``) is text;
2. ``prompt`` / ``chosen`` / ``rejected`` columns of text;
3. a labeled file with ``--label-words`` (or a multiple-choice file, or the built-in
   ``bbcnews-instruct``), read as ``--task sft`` reads it (``fedlora.data.instructions``): the
   right answer is chosen, and another of the example's choices, drawn from ``--seed``, rejected.

A file with ``chosen`` and ``rejected`` columns is read as pairs (forms 1 and 2) whatever
``--prompt-template`` and ``--label-words`` say: those apply to a labeled file (a labeled
``--test-data`` beside training pairs, say).

Every prompt and response is text (a null, a list or an object where text belongs is refused with
its row and column), ``chosen`` and ``rejected`` both message lists or both text, and every row has
the columns of the first. A pair whose two responses are the same, or with an empty one, teaches
nothing: such pairs are counted and skipped with one warning (each said once, however often the
file is read); data of nothing else is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedlora.data.cells import text_of
from fedlora.data.columns import renamed
from fedlora.data.instructions import _messages, cell, listed, load_instructions, skip_rows
from fedlora.data.loading import DEFAULT_DATASET, TextDataset, text_columns
from fedlora.data.readers import is_pattern, locate, read_rows
from fedlora.errors import UserError

#: Mixed into ``--seed`` for the rejected answers drawn from a labeled file's other choices.
REJECT_STREAM = 0xD90


@dataclass
class PairDataset(TextDataset):
    """Preference pairs: ``texts`` are the prompts, ``responses`` the chosen responses and
    ``rejected`` the rejected ones; ``labels`` and ``choices`` stay set for a labeled file (the
    Dirichlet partition and the held-out answer accuracy read them)."""

    rejected: list[str] = field(default_factory=list)

    def subset(self, idx) -> PairDataset:
        ds = super().subset(idx)
        return PairDataset(**vars(ds), rejected=[self.rejected[i] for i in idx])


#: hh-rlhf's raw transcripts: the speaker markers and the chat roles they stand for.
TRANSCRIPT_TURNS = re.compile(r"\n\n(Human|Assistant): ?")
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def _transcript(text: str) -> list | None:
    """hh-rlhf's ``\n\nHuman: …\n\nAssistant: …`` text as a message list, else None."""
    parts = TRANSCRIPT_TURNS.split(text)
    if len(parts) < 5 or parts[0].strip():   # ["", "Human", q, "Assistant", a, ...]
        return None
    return [{"role": TRANSCRIPT_ROLES[who], "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def _chat(value) -> list | None:
    """``value`` as a message list when it is one (:func:`~fedlora.data.instructions.listed`: a list,
    or in a CSV/TSV file its JSON), or an hh-rlhf transcript; else None (text, ``"[0, 1, 2]"`` too)."""
    msgs = listed(value)
    if msgs is None and isinstance(value, str):
        return _transcript(value)
    return msgs


def _with_prompt(answer: list, prompt) -> list:
    """``answer``, a message list, after the ``prompt`` column when it holds the assistant's turn alone."""
    if prompt is None or any(isinstance(m, dict) and m.get("role") != "assistant" for m in answer):
        return answer
    asked = _chat(prompt)
    return (asked if asked is not None else [{"role": "user", "content": str(prompt)}]) + answer


def _prompt_of(value, where: str) -> str | list:
    """A text pair's prompt: an hh-rlhf transcript (``\n\nHuman: …\n\nAssistant:``, as Dahoas'
    rm-static ships its prompts) as its messages before the empty assistant turn it ends with, else
    its text."""
    turns = _transcript(value) if isinstance(value, str) else None
    if turns and turns[-1] == {"role": "assistant", "content": ""} and len(turns) > 1:
        return turns[:-1]
    return text_of(value, where, "prompt")


def _from_rows(rows: list[dict], name: str) -> PairDataset:
    """Forms 1 and 2 (the first row has ``chosen`` and ``rejected``)."""
    prompts, chosen, rejected = [], [], []
    texts = "prompt" in rows[0]
    for n, row in enumerate(rows, 1):
        where = f"{name} row {n}"
        good_cell, bad_cell = cell(row, "chosen", where, "chosen/rejected"), cell(row, "rejected", where,
                                                                                 "chosen/rejected")
        good, bad = _chat(good_cell), _chat(bad_cell)
        if good is not None and bad is not None:
            asked = row.get("prompt")
            good, bad = _with_prompt(good, asked), _with_prompt(bad, asked)
            good, bad = _messages(good, f"{where} chosen"), _messages(bad, f"{where} rejected")
            if good[:-1] != bad[:-1]:
                raise UserError(f"{where}: the chosen and rejected conversations differ before"
                                " their last (assistant) message; a pair answers one prompt")
            prompts.append(good[:-1])
            chosen.append(good[-1]["content"])
            rejected.append(bad[-1]["content"])
        elif good is not None or bad is not None:
            lists, text = ("chosen", "rejected") if good is not None else ("rejected", "chosen")
            text_of(row[text], where, text)  # a null is refused as such
            raise UserError(f"{where}: {lists!r} is a message list but {text!r} is text; give both as"
                            " message lists or both as text")
        elif texts:
            prompts.append(_prompt_of(cell(row, "prompt", where, "prompt/chosen/rejected"), where))
            chosen.append(text_of(good_cell, where, "chosen"))
            rejected.append(text_of(bad_cell, where, "rejected"))
        else:
            raise UserError(f"{where}: chosen/rejected are text, so a prompt column is needed"
                            " (or make them chat message lists that start with the prompt)")
    return nonempty_pairs(PairDataset(prompts, None, [], chosen, None, rejected), name)


def nonempty_pairs(ds: PairDataset, name: str) -> PairDataset:
    """``ds`` without its pairs with an empty chosen or rejected response (one warning counts them).

    Raises
    ------
    UserError
        Every pair has an empty response.
    """
    empty = [i for i, (a, b) in enumerate(zip(ds.responses, ds.rejected, strict=True))
             if not a.strip() or not b.strip()]
    return skip_rows(ds, empty, f"{name}: every pair (all {len(ds)}) has an empty chosen or rejected"
                                " response; a preference pair needs two responses: fill them in",
                     f"{len(empty)} of {len(ds)} pairs in {name} have an empty chosen or rejected response;"
                     " they were skipped")


def _from_answers(ds: TextDataset, seed: int) -> PairDataset:
    """Form 3: the right answer chosen, another of the example's choices rejected (from ``seed``)."""
    if ds.choices is None:
        raise UserError("--task dpo needs chosen and rejected responses: a file with chosen/rejected"
                        " columns (prompt/chosen/rejected, or chat message lists), or a labeled file"
                        " with --label-words")
    rng = np.random.default_rng([seed, REJECT_STREAM])
    rejected = []
    for right, options in zip(ds.responses, ds.choices, strict=True):
        others = [c for c in options if c != right] or [right]  # one choice only: skipped as identical
        rejected.append(others[int(rng.integers(len(others)))])
    return PairDataset(**vars(ds), rejected=rejected)


def drop_identical(ds: PairDataset, name: str) -> PairDataset:
    """``ds`` without its pairs whose two responses are the same (one warning counts them).

    Raises
    ------
    UserError
        Every pair's responses are the same.
    """
    pairs = zip(ds.responses, ds.rejected, strict=True)
    same = [i for i, (a, b) in enumerate(pairs) if a.strip() == b.strip()]
    return skip_rows(ds, same, f"{name}: the chosen and rejected responses are identical in all {len(ds)}"
                               " pairs; a preference pair needs two different responses",
                     f"{len(same)} of {len(ds)} pairs in {name} have identical chosen and rejected"
                     " responses; they were skipped")


def load_preferences(spec: str, text_column: str, label_column: str, template: str = "",
                     label_words: str = "", seed: int = 0,
                     known: Callable[[], list[str]] | None = None, flags: str = "",
                     columns: dict[str, str] | None = None) -> PairDataset:
    """Preference pairs of ``spec`` (see the module docstring); ``known``: the training data's
    labels, for a held-out labeled file (:func:`fedlora.data.instructions.from_labeled`); ``flags``:
    the column flags' prefix a message names (``"test-"`` for ``--test-data``); ``columns``:
    ``--columns`` (:func:`~fedlora.data.columns.renamed`).

    Raises
    ------
    UserError
        Data without chosen/rejected responses (nor label words), chat lists whose prompts differ,
        every pair identical, or anything :func:`~fedlora.data.instructions.load_instructions` refuses.
    """
    path = locate(spec)
    here = path.exists() or is_pattern(path)
    if not (template or label_words) and spec != DEFAULT_DATASET and here:
        rows = _pair_rows(path, spec, columns)
        if rows is not None:
            return drop_identical(_from_rows(rows, path.name), path.name)
        rows = renamed(read_rows(path), columns, path.name)
        labeled = {*text_columns(text_column, rows[0], flags), label_column}   # a+b: a pair of texts
        if not labeled <= set(rows[0]) and not {"question", "choices"} <= set(rows[0]):
            raise UserError(f"{path.name} has no chosen/rejected columns (columns: {', '.join(rows[0])}):"
                            " --task dpo reads prompt/chosen/rejected, chat chosen/rejected message lists,"
                            " or a labeled file with --label-words")
    try:
        ds = load_instructions(spec, text_column, label_column, template, label_words, known, flags, columns)
    except UserError:
        rows = _pair_rows(path, spec, columns) if spec != DEFAULT_DATASET and here else None
        if rows is None:  # a pair file beside --prompt-template / --label-words (for a labeled --test-data)
            raise
        return drop_identical(_from_rows(rows, path.name), path.name)
    return drop_identical(_from_answers(ds, seed), path.name if here else spec)


def _pair_rows(path, spec: str, columns: dict[str, str] | None = None) -> list[dict] | None:
    """The rows of ``path`` (its columns renamed by ``columns``) when its first has ``chosen`` and
    ``rejected`` columns, else None.

    Raises
    ------
    UserError
        The file has no rows.
    """
    rows = renamed(read_rows(path), columns, path.name)
    if not rows:
        raise UserError(f"data file {spec!r} has no rows")
    return rows if {"chosen", "rejected"} <= set(rows[0]) else None
