"""``--eval mc``: multiple-choice questions scored by log-likelihood, as lm-eval-harness does.

Each held-out example has a prompt and choices (a multiple-choice file's, or every label's word
of a labeled file: ``fedlora.data.choices``). The prompt is rendered as ``--task sft`` renders
it (``--prompt-template``, the chat template, ``--system-prompt``), then each choice's tokens
are scored as its continuation (the choice alone, without the end of the turn):

    ll_j = Σ_t log p(c_jt | prompt, c_j<t)

* ``mc_accuracy`` (lm-eval's ``acc``): the example is right when its answer has the highest
  ``ll_j`` (the first of equal ones);
* ``mc_accuracy_norm`` (``acc_norm``): the same with ``ll_j / chars_j``, the choice's length in
  characters (lm-eval's ``len(choice)``), so long choices are not penalised for their length;
* ``loss`` and ``perplexity``: the mean negative log-likelihood of the right choices' tokens.

One prefill per prompt; the choices are scored from its KV cache
(:func:`fedlora.tasks.decode.score_choices`).

``--eval mc-letters`` (:class:`LetterChoice`) scores as lm-eval-harness scores MMLU: the prompt
lists the choices after their letters and ends ``Answer:``, and the letters are the choices.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

from fedlora.data.choices import LETTERS
from fedlora.data.loading import TextDataset
from fedlora.errors import UserError
from fedlora.tasks.base import Evaluation, Task, drop_long, register_evaluation
from fedlora.tasks.decode import score_choices
from fedlora.tasks.render import ChatFormat, encode_pairs, leading_bos
from fedlora.tasks.sft import cut_prompts, warn_cut


@dataclass
class ChoiceSet:
    """Held-out multiple-choice examples, shortest prompt first: ``prompts`` (token ids), each
    example's ``choices`` (token ids) and their ``sizes`` (characters of their texts), the
    ``answers`` (the right choice's index), ``pad`` (the pad token id)."""

    prompts: list[list[int]]
    choices: list[list[list[int]]]
    sizes: list[list[int]]
    answers: list[int]
    pad: int
    headline: ClassVar[str] = "mc_accuracy"


def fit_prompts(prompts: list[list[int]], room: list[int], max_length: int,
                bos: int | None = None) -> list[list[int]]:
    """The prompts cut from the left so that prompt i and ``room[i]`` tokens (its longest choice)
    fit ``max_length``, a leading ``bos`` kept (:func:`~fedlora.tasks.sft.cut_prompts`); one warning
    counts the cut ones.

    Raises
    ------
    UserError
        A choice alone leaves no token of ``max_length`` to its prompt (:func:`choice_set` drops
        those rows before).
    """
    if max(room) >= max_length:
        raise UserError(f"a choice alone has {max(room)} tokens, which leaves its prompt none of --max-length"
                        f" {max_length}; raise --max-length or shorten the choices")
    out, cut = cut_prompts(prompts, room, max_length, bos)
    warn_cut(sum(cut), len(prompts), "multiple-choice prompts", max_length, kept="choices")
    return out


def choice_set(tokenizer, ds, cfg) -> ChoiceSet:
    """The held-out examples ``ds`` as a :class:`ChoiceSet`; those with a choice longer than
    ``--max-length`` alone are not scored (one warning counts them).

    Raises
    ------
    UserError
        The data has no choices (free-form responses), two labels have one word (``--label-words``),
        a choice is no tokens to the tokenizer, or every example has a choice longer than
        ``--max-length``.
    """
    if ds.choices is None or ds.labels is None:
        raise UserError("--eval mc needs choices for every held-out example, and this data has free-form"
                        " responses: give a .jsonl with question, choices and answer, MMLU's CSV"
                        " (question,A,B,C,D,answer), or a labeled file with --label-words")
    _check_distinct(ds.choices, ds.label_names)
    heads, choices = _encode(tokenizer, ds, ChatFormat(tokenizer, cfg.chat_template, cfg.system_prompt))
    _check_tokens(ds.choices, choices)
    keep = drop_long([max(map(len, row)) for row in choices], cfg, tokenizer, "choice")
    if len(keep) < len(ds):
        ds, heads, choices = ds.subset(keep), [heads[i] for i in keep], [choices[i] for i in keep]
    prompts = fit_prompts(heads, [max(map(len, row)) for row in choices], cfg.max_length,
                          leading_bos(tokenizer))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return ChoiceSet(prompts=[prompts[i] for i in order], choices=[choices[i] for i in order],
                     sizes=[[len(c) for c in ds.choices[i]] for i in order],
                     answers=[ds.labels[i] for i in order], pad=tokenizer.pad_token_id)


#: A stand-in answer (a private-use character) that shows where a template writes the answer.
MARK = "\ue000"


def _encode(tokenizer, ds, chat: ChatFormat) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Each example's prompt ids, and each of its choices' ids as the continuation of that prompt.

    A choice is read as the rendered answer reads it: the template's text before an answer (what
    precedes :data:`MARK` in the completion, e.g. Llama-2's space after ``[/INST]``), then the
    choice; its ids are those it has after the prompt's (:func:`~fedlora.tasks.render.encode_pairs`).
    """
    pairs, counts = [], []
    for prompt, row in zip(ds.texts, ds.choices, strict=True):
        head, tail = chat.split(prompt, MARK)
        lead = tail[:max(tail.find(MARK), 0)]
        pairs += [(head, lead + c) for c in row]
        counts.append(len(row))
    prompt_ids, ids = encode_pairs(tokenizer, pairs)
    starts = [0, *itertools.accumulate(counts)]
    return [prompt_ids[a] for a in starts[:-1]], [ids[a:b] for a, b in itertools.pairwise(starts)]


def _check_distinct(choices: list[list[str]], label_names: list[str]) -> None:
    """Refuse label words that are not all different: two labels given one word by ``--label-words``
    (``1=bad,2=bad``) are two classes that no score can tell apart. (A multiple-choice file's row that
    holds a choice twice is scored by text: either copy is the right answer.)

    Raises
    ------
    UserError
        The examples' choices are one list (label words) that holds one text twice.
    """
    twice = choices[0] if choices and len(set(choices[0])) < len(choices[0]) else None
    if twice is None or any(row != twice for row in choices):
        return
    word = next(c for n, c in enumerate(twice) if c in twice[:n])
    same = [name for name, c in zip(label_names, twice, strict=False) if c == word][:2]
    which = f"labels {same[0]!r} and {same[1]!r} have" if len(same) == 2 else "two choices have"
    raise UserError(f"--eval mc: {which} the same word {word!r} (--label-words), and two choices of one text"
                    " cannot be told apart; give each label its own word, or use --eval generate")


def _check_tokens(choices: list[list[str]], ids: list[list[list[int]]]) -> None:
    """Refuse a choice that the tokenizer encodes as no tokens (a zero-width space, a control
    character to a BERT tokenizer): its log-probability would be 0, the highest there is, and it would
    win every question it is in.

    Raises
    ------
    UserError
        Such a choice, named with the number of examples that hold it.
    """
    empty = [[c for c, t in zip(row, toks, strict=True) if not t]
             for row, toks in zip(choices, ids, strict=True)]
    if any(empty):
        first = next(e[0] for e in empty if e)
        rows = sum(first in row for row in empty)
        raise UserError(f"--eval mc: the choice {first!r} ({rows} example(s)) is no tokens to this model's"
                        " tokenizer, so its log-probability would be 0 and it would win every question;"
                        " give it a text the tokenizer keeps")


def first_best(values: list[float]) -> int:
    """The index of the largest value, the first of equal ones (numpy's ``argmax``)."""
    return max(range(len(values)), key=values.__getitem__)


@register_evaluation
class MultipleChoice(Evaluation):
    """``--eval mc``: each choice's log-likelihood given the prompt (see the module docstring)."""

    name = "mc"

    def eval_set(self, task: Task, tokenizer, ds, cfg) -> ChoiceSet:
        if ds.choices is None or ds.labels is None:
            return choice_set(tokenizer, ds, cfg)    # its refusal: no choices
        return choice_set(tokenizer, self.scored(ds, cfg), cfg)

    def evaluate(self, task: Task, fm, data: ChoiceSet, cfg) -> dict[str, float]:
        hits = hits_norm = 0
        nll = tokens = 0.0
        n = len(data.prompts)
        for start in range(0, n, cfg.eval_batch_size):
            end = min(n, start + cfg.eval_batch_size)
            scores = score_choices(fm, data.prompts[start:end], data.choices[start:end], data.pad)
            for i, row in zip(range(start, end), scores, strict=True):
                answer, texts = data.answers[i], data.choices[i]    # right: the answer's text (a
                hits += texts[first_best(row)] == texts[answer]     # choice given twice scores twice)
                norm = first_best([s / b for s, b in zip(row, data.sizes[i], strict=True)])
                hits_norm += texts[norm] == texts[answer]
                nll -= row[answer]
                tokens += len(data.choices[i][answer])
        acc, mean = hits / max(n, 1), nll / max(tokens, 1.0)
        return {"accuracy": acc, "mc_accuracy": acc, "mc_accuracy_norm": hits_norm / max(n, 1), "loss": mean,
                "perplexity": math.exp(min(mean, 50.0)), "eval_examples": n}


def lettered(ds):
    """``ds`` as MMLU's prompt lists its choices (lm-eval-harness' ``mmlu``): each question followed
    by its choices after their letters, then ``Answer:``; the choices become the letters
    ``A``, ``B``, … and the answers stay their indices. A chat's question gets them in its last
    message."""
    def ask(text, row: list[str]):
        listed = "".join(f"\n{LETTERS[j]}. {c}" for j, c in enumerate(row)) + "\nAnswer:"
        if isinstance(text, list):
            return [*text[:-1], {**text[-1], "content": text[-1]["content"] + listed}]
        return text + listed

    texts = [ask(t, row) for t, row in zip(ds.texts, ds.choices, strict=True)]
    letters = [list(LETTERS[:len(row)]) for row in ds.choices]
    answers = [row[y] for row, y in zip(letters, ds.labels, strict=True)]
    return TextDataset(texts, ds.labels, ds.label_names, answers, letters, source=ds.source, groups=ds.groups)


@register_evaluation
class LetterChoice(MultipleChoice):
    """``--eval mc-letters``: the choices listed under each question after their letters, and the
    letters scored as the continuation (:func:`lettered`): how lm-eval-harness scores MMLU, where
    ``mc`` scores each choice's own text (its ``hellaswag``/``arc`` way). ``mc_accuracy_norm`` equals
    ``mc_accuracy`` (every letter is one character)."""

    name = "mc-letters"

    def scored(self, ds, cfg):
        """``ds`` :func:`lettered` (then led by ``--fewshot`` shots); ``ds`` itself without choices.

        Raises
        ------
        UserError
            A question has more choices than there are letters.
        """
        if ds.choices is None or ds.labels is None:
            return ds
        if max(map(len, ds.choices)) > len(LETTERS):
            raise UserError(f"--eval mc-letters gives each choice a letter, and a question has"
                            f" {max(map(len, ds.choices))} choices (at most {len(LETTERS)}): use --eval mc")
        return super().scored(lettered(ds), cfg)
