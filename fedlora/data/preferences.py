"""Preference pairs for ``--task dpo``: a prompt, the response to prefer and the one to avoid.

A file is read in the first form its columns fit:

1. chat: ``chosen`` and ``rejected`` lists of ``{"role", "content"}`` messages (hh-rlhf and
   UltraFeedback style) whose last message is the assistant's response; the earlier ones, the
   same in both, are the prompt. Where the lists hold the assistant's answer alone (TRL's
   explicit-prompt form), the ``prompt`` column (a message list, or text: the user's turn) comes
   before it; otherwise a ``prompt`` column beside them is ignored. hh-rlhf's raw transcripts
   (text of ``\n\nHuman: …\n\nAssistant: …`` turns) are read as such lists;
2. ``prompt`` / ``chosen`` / ``rejected`` columns of text;
3. a labeled file with ``--label-words`` (or a multiple-choice file, or the built-in
   ``bbcnews-instruct``), read as ``--task sft`` reads it (``fedlora.data.instructions``): the
   right answer is chosen, and another of the example's choices, drawn from ``--seed``, rejected.

A pair whose two responses are the same teaches nothing: such pairs are counted and skipped
with one warning; data of nothing else is refused.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from fedlora.data.instructions import _messages, load_instructions
from fedlora.data.loading import DEFAULT_DATASET, TextDataset
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
        return PairDataset(ds.texts, ds.labels, ds.label_names, ds.responses, ds.choices,
                           [self.rejected[i] for i in idx])


#: hh-rlhf's raw transcripts: the speaker markers and the chat roles they stand for.
TRANSCRIPT_TURNS = re.compile(r"\n\n(Human|Assistant): ")
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def _transcript(text: str) -> list | None:
    """hh-rlhf's ``\n\nHuman: …\n\nAssistant: …`` text as a message list, else None."""
    parts = TRANSCRIPT_TURNS.split(text)
    if len(parts) < 5 or parts[0].strip():   # ["", "Human", q, "Assistant", a, ...]
        return None
    return [{"role": TRANSCRIPT_ROLES[who], "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def _chat(value) -> list | None:
    """``value`` as a message list when it is one (or its JSON, or an hh-rlhf transcript), else None."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, str):
        return _transcript(value)
    return value if isinstance(value, list) else None


def _with_prompt(answer: list, prompt) -> list:
    """``answer``, a message list, after the ``prompt`` column when it holds the assistant's turn alone."""
    if prompt is None or any(isinstance(m, dict) and m.get("role") != "assistant" for m in answer):
        return answer
    asked = _chat(prompt)
    return (asked if asked is not None else [{"role": "user", "content": str(prompt)}]) + answer


def _from_rows(rows: list[dict], name: str) -> PairDataset:
    """Forms 1 and 2 (the rows have ``chosen`` and ``rejected``)."""
    prompts, chosen, rejected = [], [], []
    for n, row in enumerate(rows, 1):
        good, bad = _chat(row["chosen"]), _chat(row["rejected"])
        if good is not None and bad is not None:
            good, bad = _with_prompt(good, row.get("prompt")), _with_prompt(bad, row.get("prompt"))
            good, bad = _messages(good, f"{name} row {n} chosen"), _messages(bad, f"{name} row {n} rejected")
            if good[:-1] != bad[:-1]:
                raise UserError(f"{name} row {n}: the chosen and rejected conversations differ before"
                                " their last (assistant) message; a pair answers one prompt")
            prompts.append(good[:-1])
            chosen.append(good[-1]["content"])
            rejected.append(bad[-1]["content"])
        elif "prompt" in row:
            prompts.append(str(row["prompt"]))
            chosen.append(str(row["chosen"]))
            rejected.append(str(row["rejected"]))
        else:
            raise UserError(f"{name} row {n}: chosen/rejected are text, so a prompt column is needed"
                            " (or make them chat message lists that start with the prompt)")
    return PairDataset(prompts, None, [], chosen, None, rejected)


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
    return PairDataset(ds.texts, ds.labels, ds.label_names, ds.responses, ds.choices, rejected)


def drop_identical(ds: PairDataset, name: str) -> PairDataset:
    """``ds`` without its pairs whose two responses are the same (one warning counts them).

    Raises
    ------
    UserError
        Every pair's responses are the same.
    """
    pairs = zip(ds.responses, ds.rejected, strict=True)
    same = [i for i, (a, b) in enumerate(pairs) if a.strip() == b.strip()]
    if not same:
        return ds
    if len(same) == len(ds):
        raise UserError(f"{name}: the chosen and rejected responses are identical in all {len(ds)} pairs;"
                        " a preference pair needs two different responses")
    print(f"fedlora: {len(same)} of {len(ds)} pairs in {name} have identical chosen and rejected responses;"
          " they were skipped", file=sys.stderr)
    drop = set(same)
    return ds.subset([i for i in range(len(ds)) if i not in drop])


def load_preferences(spec: str, text_column: str, label_column: str, template: str = "",
                     label_words: str = "", seed: int = 0) -> PairDataset:
    """Preference pairs of ``spec`` (see the module docstring).

    Raises
    ------
    UserError
        Data without chosen/rejected responses (nor label words), chat lists whose prompts differ,
        every pair identical, or anything :func:`~fedlora.data.instructions.load_instructions` refuses.
    """
    path = locate(spec)
    here = path.exists() or is_pattern(path)
    if not (template or label_words) and spec != DEFAULT_DATASET and here:
        rows = read_rows(path)
        if not rows:
            raise UserError(f"data file {spec!r} has no rows")
        if {"chosen", "rejected"} <= set(rows[0]):
            return drop_identical(_from_rows(rows, path.name), path.name)
        if not {text_column, label_column} <= set(rows[0]) and not {"question", "choices"} <= set(rows[0]):
            raise UserError(f"{path.name} has no chosen/rejected columns (columns: {', '.join(rows[0])}):"
                            " --task dpo reads prompt/chosen/rejected, chat chosen/rejected message lists,"
                            " or a labeled file with --label-words")
    ds = load_instructions(spec, text_column, label_column, template, label_words)
    return drop_identical(_from_answers(ds, seed), path.name if here else spec)
