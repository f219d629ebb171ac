"""Instruction data for ``--task sft``: prompts and the responses to learn.

A file (or folder: any form of :mod:`fedlora.data.readers`) is read in the first form its
columns fit:

1. chat: a ``messages`` list of ``{"role", "content"}`` whose last message is the
   assistant's (the response); the earlier ones are the prompt;
2. ``prompt`` / ``response`` columns;
3. alpaca: ``instruction`` (+ optional ``input``) / ``output``;
4. a labeled file (``--text-column`` / ``--label-column``): the prompt is
   ``--prompt-template`` with the text in its ``{text}`` slot, the response is the
   label's word from ``--label-words`` (``0=negative,1=positive``) or the label itself.

A multiple-choice file (``question``/``choices``/``answer`` rows, or MMLU's CSV:
``fedlora.data.choices``) is read first, its question put in ``--prompt-template``'s slot
and its right choice as the response. ``--label-words`` selects form 4 directly, and so does
``--prompt-template`` for a file that is not multiple choice. The built-in
``bbcnews-instruct`` (``bbcnews`` reads the same) is BBC News in form 4, answered with
the category's name; each prompt holds the article's lead, its first :data:`BBC_LEAD_WORDS`
words (the headline and opening sentences; a whole article is a median of ~500 tokens).
Closed-set answers (forms 4 and multiple choice) keep their ``choices``.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.data.choices import read_choice_file
from fedlora.data.loading import DEFAULT_DATASET, TextDataset, load_bbcnews, load_file
from fedlora.data.readers import read_rows
from fedlora.errors import UserError

BBC_INSTRUCT = "bbcnews-instruct"
BBC_TEMPLATE = ("{text}\n\nWhich category is this news article: business, entertainment, politics,"
                " sports or tech? Answer with one word.")
#: Words of a BBC News article that its ``bbcnews-instruct`` prompt holds.
BBC_LEAD_WORDS = 64


def parse_label_words(text: str) -> dict[str, str]:
    """``0=negative,1=positive`` -> ``{"0": "negative", "1": "positive"}``."""
    words: dict[str, str] = {}
    for item in (v for v in text.split(",") if v.strip()):
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise UserError(f"--label-words takes LABEL=WORD pairs like 0=negative,1=positive, got {text!r}")
        words[label.strip()] = word.strip()
    return words


def lead(ds: TextDataset, words: int) -> TextDataset:
    """``ds`` with each text cut to its first ``words`` words (" …" marks a cut)."""
    cut = [" ".join(t.split()[:words]) + (" …" if len(t.split()) > words else "") for t in ds.texts]
    return TextDataset(cut, ds.labels, ds.label_names, ds.responses, ds.choices)


def fill_template(template: str, texts: list[str]) -> list[str]:
    """``template`` around each text (in its ``{text}`` slot); the texts themselves without one."""
    if template and "{text}" not in template:
        raise UserError(f"--prompt-template needs a {{text}} slot for the text, got {template!r}")
    return [template.replace("{text}", t) if template else t for t in texts]


def from_labeled(ds: TextDataset, template: str, label_words: dict[str, str]) -> TextDataset:
    """Questions from a labeled dataset: ``template`` around each text, the label's word as the
    answer; every label's word is a choice."""
    missing = sorted(set(ds.label_names) - set(label_words)) if label_words else []
    if missing:
        raise UserError(f"--label-words has no word for label(s) {', '.join(map(repr, missing[:5]))};"
                        f" give one for each of {', '.join(ds.label_names)}")
    answers = [label_words.get(name, name) for name in ds.label_names]
    prompts = fill_template(template, ds.texts)
    assert ds.labels is not None
    return TextDataset(prompts, ds.labels, ds.label_names, [answers[y] for y in ds.labels],
                       [answers] * len(ds.labels))


def _messages(value, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{where}: 'messages' is not a JSON list of {{role, content}}") from None
    if (not isinstance(value, list) or len(value) < 2
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value)):
        raise UserError(f"{where}: 'messages' must list at least two {{role, content}} objects")
    if value[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's response,"
                        f" got role {value[-1]['role']!r}")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def _pairs(rows: list[dict], name: str) -> TextDataset | None:
    """Forms 1-3, or None when the columns fit none of them."""
    cols = set(rows[0])
    prompts, responses = [], []
    if "messages" in cols:
        for n, r in enumerate(rows, 1):
            msgs = _messages(r["messages"], f"{name} row {n}")
            prompts.append(msgs[:-1])
            responses.append(msgs[-1]["content"])
    elif {"prompt", "response"} <= cols:
        prompts = [str(r["prompt"]) for r in rows]
        responses = [str(r["response"]) for r in rows]
    elif {"instruction", "output"} <= cols:
        for r in rows:
            extra = str(r.get("input") or "").strip()
            prompts.append(str(r["instruction"]) + (f"\n\n{extra}" if extra else ""))
        responses = [str(r["output"]) for r in rows]
    else:
        return None
    return TextDataset(prompts, None, [], responses)


def load_instructions(spec: str, text_column: str, label_column: str, template: str = "",
                      label_words: str = "") -> TextDataset:
    """Prompts and responses of ``spec`` (a file or ``bbcnews-instruct``), see the module docstring.

    Raises
    ------
    UserError
        Columns that fit no form, a bad ``messages`` list, a label without a word, a
        template without ``{text}``, a multiple-choice row without choices or with an answer
        outside them.
    """
    words = parse_label_words(label_words)
    if spec in (BBC_INSTRUCT, DEFAULT_DATASET):  # the bundled BBC News, as questions
        return from_labeled(lead(load_bbcnews(), BBC_LEAD_WORDS), template or BBC_TEMPLATE, words)
    path = Path(spec)
    choices = None if words else read_choice_file(path)
    if choices is not None:
        choices.texts = fill_template(template, choices.texts)
        return choices
    if not (template or words):
        rows = read_rows(path)
        if not rows:
            raise UserError(f"data file {spec!r} has no rows")
        pairs = _pairs(rows, path.name)
        if pairs is not None:
            return pairs
        if not {text_column, label_column} <= set(rows[0]):
            raise UserError(
                f"{path.name} has no prompt/response columns (columns: {', '.join(rows[0])}): --task sft"
                " reads prompt/response, instruction/input/output, messages, question/choices/answer"
                " (multiple choice), or --text-column and --label-column with --label-words")
    return from_labeled(load_file(path, text_column, label_column), template, words)
