"""Instruction data for ``--task sft``: prompts and the responses to learn.

A file (or folder: any form of :mod:`fedlora.data.readers`) is read in the first form its
columns fit:

1. chat: a ``messages`` list of ``{"role", "content"}`` whose last message is the
   assistant's (the response); the earlier ones are the prompt. ShareGPT's ``conversations`` of
   ``{"from", "value"}`` (``human``/``gpt``/``system``) read the same;
2. a prompt and a response column, the first pair of :data:`PAIR_FORMS` the file has:
   ``prompt``/``response``, ``prompt``/``completion`` (TRL's form, whose prompt may be a message list
   and completion a one-message list), alpaca's ``instruction`` (+ optional ``input``)/``output``,
   Dolly's ``instruction`` (+ optional ``context``)/``response``, or ``question``/``answer``
   (GSM8K: without ``choices``, so not multiple choice);
3. a labeled file (``--text-column`` / ``--label-column``): the prompt is
   ``--prompt-template`` with the text in its ``{text}`` slot, the response is the
   label's word from ``--label-words`` (``0=negative,1=positive``) or the label itself.

A multiple-choice file (``question``/``choices``/``answer`` rows, or MMLU's CSV:
``fedlora.data.choices``) is read first, its question put in ``--prompt-template``'s slot
and its right choice as the response. ``--label-words`` selects form 3 directly, and so does
``--prompt-template`` for a file that is not multiple choice. The built-in
``bbcnews-instruct`` (``bbcnews`` reads the same) is BBC News in form 3, answered with
the category's name; each prompt holds the article's lead, its first :data:`BBC_LEAD_WORDS`
words (the headline and opening sentences; a whole article is a median of ~500 tokens).
Closed-set answers (form 3 and multiple choice) keep their ``choices``: in form 3 every label
that ``--label-words`` names or the data holds (a held-out file's choices add the training
data's labels), whichever of them a file's rows use.

A message list is a list (a JSON array, a Parquet list), or a string holding the JSON of a list of
``{role, content}`` objects (a CSV/TSV cell, or messages a file stored as strings); any other string
is text whatever it holds (``[{"entity": "Alice"}]``, a structured answer: :func:`listed`).

Every prompt and response is text (a number reads as it is written): a null, a list or an object
where text belongs is refused with its row. A message's ``content`` may be a list of OpenAI-style
text parts (``{"type": "text", "text": …}``), read as their texts joined by newlines. Every row
needs the columns of the first row's form. Rows whose response is empty are skipped with one
warning counting them; a file of nothing else is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fedlora.data.cells import text_of
from fedlora.data.choices import read_choice_file
from fedlora.data.columns import renamed
from fedlora.data.loading import (
    DEFAULT_DATASET,
    TextDataset,
    label_order,
    load_bbcnews,
    load_file,
    text_columns,
)
from fedlora.data.readers import locate, read_rows
from fedlora.errors import UserError, warn_once

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
        if label.strip() in words:  # the last one was taken
            raise UserError(f"--label-words gives label {label.strip()!r} twice ({text!r}): keep one")
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


def from_labeled(ds: TextDataset, template: str, label_words: dict[str, str],
                 known: Callable[[], list[str]] | None = None) -> TextDataset:
    """Questions from a labeled dataset: ``template`` around each text, the label's word as the
    answer. The choices are every label's word: each label of ``label_words``, or without them
    each label of ``ds`` and of ``known()`` (the training data's, for a held-out file), whichever
    of them ``ds`` holds."""
    missing = sorted(set(ds.label_names) - set(label_words)) if label_words else []
    if missing:
        raise UserError(f"--label-words has no word for label(s) {', '.join(map(repr, missing[:5]))};"
                        f" give one for each of {', '.join(ds.label_names)}")
    more = list(label_words) if label_words else (known() if known else [])
    names = label_order([*ds.label_names, *more])
    answers = [label_words.get(name, name) for name in names]
    prompts = fill_template(template, ds.joined())   # a pair of texts (--text-column a+b): one text
    assert ds.labels is not None
    index = [names.index(name) for name in ds.label_names]
    labels = [index[y] for y in ds.labels]
    return TextDataset(prompts, labels, names, [answers[y] for y in labels], [answers] * len(labels))


def labeled_names(spec: str, text_column: str, label_column: str, template: str = "") -> list[str]:
    """The labels of ``spec`` where it is read as a labeled file (form 3 without ``--label-words``),
    else none: what a held-out labeled file adds to its own labels as choices."""
    if not spec:
        return []
    try:
        if spec in (BBC_INSTRUCT, DEFAULT_DATASET):
            return load_bbcnews().label_names
        path = locate(spec)
        if read_choice_file(path) is not None:
            return []
        rows = read_rows(path)
        if not rows or (not template and _form(rows[0]) is not None):
            return []
        return load_file(path, text_column, label_column).label_names
    except UserError:  # the training data's own errors are said where it is read
        return []


#: Prompt/response column pairs (form 2), in the order they are tried: (prompt, response, a column
#: whose text, where a row has one, follows the prompt after a blank line).
PAIR_FORMS: tuple[tuple[str, str, str], ...] = (
    ("prompt", "response", ""), ("prompt", "completion", ""), ("instruction", "output", "input"),
    ("instruction", "response", "context"), ("question", "answer", ""))
#: ShareGPT's speakers (``from``) as chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def _content(value, where: str) -> str:
    """A message's content: text, or a list of OpenAI-style text parts (their texts, joined by
    newlines)."""
    if not isinstance(value, list):
        return text_of(value, where, "content")
    kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in value]
    other = next((k for k in kinds if k != "text"), None)
    if other is not None or not value:
        raise UserError(f"{where}: a message's content parts must be text ({{\"type\": \"text\","
                        f" \"text\": ...}}), got {'no parts' if not value else repr(other) + ' parts'};"
                        " give the content as text, or drop the row")
    return "\n".join(text_of(p.get("text"), where, "text part") for p in value)


def _message(m, where: str) -> dict[str, str]:
    """One ``{"role", "content"}`` message, from that form or ShareGPT's ``{"from", "value"}``."""
    if isinstance(m, dict) and "role" in m and "content" in m:
        return {"role": text_of(m["role"], where, "role"), "content": _content(m["content"], where)}
    if isinstance(m, dict) and m.get("from") in SHAREGPT_ROLES and "value" in m:
        return {"role": SHAREGPT_ROLES[m["from"]], "content": _content(m["value"], where)}
    raise UserError(f"{where}: every message must be {{role, content}} (or ShareGPT's {{from, value}},"
                    f" from one of {', '.join(SHAREGPT_ROLES)}), got {str(m)[:60]!r}")


def _chat_list(value, where: str, least: int) -> list[dict[str, str]]:
    """``value`` (a list, or its JSON) as at least ``least`` messages."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{where}: the messages are not a JSON list of {{role, content}}") from None
    if not isinstance(value, list) or len(value) < least:
        raise UserError(f"{where}: the messages must list at least {least} {{role, content}} objects")
    return [_message(m, where) for m in value]


def _messages(value, where: str) -> list[dict[str, str]]:
    """A conversation whose last message is the assistant's response."""
    msgs = _chat_list(value, where, 2)
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's response,"
                        f" got role {msgs[-1]['role']!r}")
    return msgs


def listed(value) -> list | None:
    """``value`` as a message list where it is one, else None: a list, or a string holding the JSON of
    a list of ``{role, content}`` objects (a CSV/TSV cell, whose values are all text, or a JSON/Parquet
    file that stored its messages as strings). Any other string is text, whatever it looks like
    (``[{"entity": "Alice"}]``, a structured answer, ``"[0, 1, 2]"``)."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    chat = isinstance(parsed, list) and parsed and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                        for m in parsed)
    return parsed if chat else None


def _prompt(value, where: str, column: str = "prompt") -> str | list[dict[str, str]]:
    """A prompt column's value: text, or (TRL's conversational form) a message list (:func:`listed`)."""
    msgs = listed(value)
    return text_of(value, where, column) if msgs is None else _chat_list(msgs, where, 1)


def _response(value, where: str, column: str = "response") -> str:
    """A response column's value: text, or the content of a message list's last message."""
    said = _prompt(value, where, column)
    return said if isinstance(said, str) else said[-1]["content"]


def cell(row: dict, column: str, where: str, form: str):
    """``row[column]``, which the first row's form (``form``: its columns) has every row hold.

    Raises
    ------
    UserError
        ``row`` lacks ``column``.
    """
    if column not in row:
        raise UserError(f"{where} has no {column!r} column, which the first row's form ({form}) needs;"
                        f" give every row the same columns (this one has: {', '.join(row) or 'none'})")
    return row[column]


def skip_rows(ds, bad: list[int], every: str, some: str):
    """``ds`` (a ``TextDataset`` or a ``PairDataset``) without its rows ``bad``, said in one warning
    (``some``).

    Raises
    ------
    UserError
        Every row is bad (``every``: the message).
    """
    if not bad:
        return ds
    if len(bad) == len(ds):
        raise UserError(every)
    warn_once(some)
    drop = set(bad)
    return ds.subset([i for i in range(len(ds)) if i not in drop])


def nonempty(ds: TextDataset, name: str, what: str = "response") -> TextDataset:
    """``ds`` without its rows whose response is empty (one warning counts them).

    Raises
    ------
    UserError
        Every response is empty.
    """
    assert ds.responses is not None
    empty = [i for i, r in enumerate(ds.responses) if not r.strip()]
    return skip_rows(ds, empty, f"{name}: every {what} is empty (all {len(ds)} rows); there is nothing to"
                                f" learn: fill in the {what}s",
                     f"{len(empty)} of {len(ds)} rows of {name} have an empty {what}; they were skipped")


def _pairs(rows: list[dict], name: str) -> TextDataset | None:
    """Forms 1 and 2, or None when the columns fit neither."""
    cols = set(rows[0])
    chat = next((c for c in ("messages", "conversations") if c in cols), None)
    if chat:
        convs = [_messages(cell(r, chat, f"{name} row {n}", chat), f"{name} row {n}")
                 for n, r in enumerate(rows, 1)]
        said = [m[-1]["content"] for m in convs]
        return nonempty(TextDataset([m[:-1] for m in convs], None, [], said), name)
    form = next((f for f in PAIR_FORMS if {f[0], f[1]} <= cols), None)
    if form is None:
        return None
    ask, answer, extra = form
    _check_kept(cols - {ask, answer, extra}, name, f"{ask}/{answer}")
    prompts, responses = [], []
    for n, r in enumerate(rows, 1):
        where = f"{name} row {n}"
        prompt = _prompt(cell(r, ask, where, f"{ask}/{answer}"), where, ask)
        more = text_of(r.get(extra) or "", where, extra).strip() if extra else ""
        prompts.append(f"{prompt}\n\n{more}" if more and isinstance(prompt, str) else prompt)
        responses.append(_response(cell(r, answer, where, f"{ask}/{answer}"), where, answer))
    return nonempty(TextDataset(prompts, None, [], responses), name)


#: Columns a prompt/response form would drop without a word, and what to do instead.
UNREAD = {**dict.fromkeys(("choices", "options", "endings"), (
              "multiple choice is read from question/choices/answer rows, the choices a list (JSONL,"
              " Parquet) and the answer an index or letter, or MMLU's CSV (question,A,B,C,D,answer)")),
          **dict.fromkeys(("passage", "context", "article", "input", "system", "system_prompt"), (
              "join it to the prompt so that the model reads it (--columns prompt=passage+question,"
              "response=answer), or write it into a messages file; a context column is read by Dolly's form:"
              " --columns instruction=QUESTION,response=ANSWER"))}


def _check_kept(others: set[str], name: str, form: str) -> None:
    """Refuse a prompt/response file whose rows hold a column of :data:`UNREAD` besides its form's:
    training on the rest would drop it (a question/answer file's choices: the answer's letter would
    be learned as the response; a passage: the question alone would be the prompt).

    Raises
    ------
    UserError
        Such a column is there (one line: what it would lose and how to give it).
    """
    col = next((c for c in sorted(others) if c.lower() in UNREAD), None)
    if col is not None:
        raise UserError(f"{name}: its {form} rows also have a {col!r} column, which that form does not read"
                        f" (it would be dropped): {UNREAD[col.lower()]}")


def _form(row: dict) -> str | None:
    """The columns of form 1 or 2 that ``row`` has (``messages``, ``instruction/output``), else None."""
    chat = next((c for c in ("messages", "conversations") if c in row), None)
    return chat or next((f"{a}/{b}" for a, b, _ in PAIR_FORMS if {a, b} <= set(row)), None)


def _flags_hint(path, template: str, words: dict[str, str]) -> None:
    """Refuse ``--prompt-template`` / ``--label-words`` on a file of prompts and responses (forms 1
    and 2), which is read without them; nothing for any other file."""
    rows = read_rows(path)
    form = _form(rows[0]) if rows else None
    if form is not None:
        given = [f for f, on in (("--prompt-template", template), ("--label-words", words)) if on]
        flags, verb = " and ".join(given), "are" if len(given) > 1 else "is"
        raise UserError(f"{path.name} holds prompts and responses ({form}), which are read as they are:"
                        f" {flags} {verb} for a labeled file (--text-column and --label-column);"
                        f" drop {flags}")


def load_instructions(spec: str, text_column: str, label_column: str, template: str = "",
                      label_words: str = "", known: Callable[[], list[str]] | None = None,
                      flags: str = "", columns: dict[str, str] | None = None) -> TextDataset:
    """Prompts and responses of ``spec`` (a file or ``bbcnews-instruct``), see the module docstring;
    ``known``: the training data's labels, for a held-out labeled file (:func:`from_labeled`);
    ``flags``: the column flags' prefix a message names (``"test-"`` for ``--test-data``);
    ``columns``: ``--columns``, the file's columns read under a form's names
    (:func:`~fedlora.data.columns.renamed`).

    Raises
    ------
    UserError
        Columns that fit no form, a bad ``messages`` list, a label without a word, a
        template without ``{text}``, a multiple-choice row without choices or with an answer
        outside them.
    """
    words = parse_label_words(label_words)
    if spec in (BBC_INSTRUCT, DEFAULT_DATASET):  # the bundled BBC News, as questions
        return from_labeled(lead(load_bbcnews(), BBC_LEAD_WORDS), template or BBC_TEMPLATE, words, known)
    path = locate(spec)
    choices = None if words else read_choice_file(path, columns)
    if choices is not None:
        choices.texts = fill_template(template, choices.texts)
        return choices
    if not (template or words):
        rows = renamed(read_rows(path), columns, path.name)
        if not rows:
            raise UserError(f"data file {spec!r} has no rows")
        pairs = _pairs(rows, path.name)
        if pairs is not None:
            return pairs
        if not {*text_columns(text_column, rows[0], flags), label_column} <= set(rows[0]):  # a+b: a pair
            raise UserError(
                f"{path.name} has no prompt/response columns (columns: {', '.join(rows[0])}): --task sft"
                f" reads messages or conversations, {', '.join(f'{a}/{b}' for a, b, _ in PAIR_FORMS)},"
                " question/choices/answer (multiple choice), or --text-column and --label-column with"
                " --label-words")
    try:
        labeled = load_file(path, text_column, label_column, flags)
    except UserError:
        if template or words:
            _flags_hint(path, template, words)
        raise
    return from_labeled(labeled, template, words, known)
