"""``--eval mc-partial``: Winogrande's partial scoring, as lm-eval-harness scores it.

A question is a sentence with a blank ``_``, and each choice fills it. The text before the blank,
choice j in it, is context j; the text after the blank is the one target every context shares::

    context_j = sentence[:blank] + choice_j          target = " " + sentence[blank + 1:].strip()
    ll_j = Σ_t log p(target_t | context_j, target_<t)

The example is right when its answer's context gives the target the highest ``ll_j`` (the first of
equal ones). The target is the same for every choice, so dividing by its length changes no pick:
``mc_accuracy_norm`` equals ``mc_accuracy``. The contexts are plain text, led by the
beginning-of-text token where the tokenizer puts one before every text (no chat template: the model
continues a sentence, it does not answer a turn); ``loss`` is the right context's target's mean
negative log-likelihood. Files: Winogrande's ``sentence``/``option1``/``option2``/``answer`` through
``--columns question=sentence,choices=option1+option2`` (its 1-based answers are read as such).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from fedlora.errors import UserError
from fedlora.tasks.base import Evaluation, Task, register_evaluation
from fedlora.tasks.choice import first_best, fit_prompts
from fedlora.tasks.decode import score_choices
from fedlora.tasks.render import encode_pairs, leading_bos


@dataclass
class PartialSet:
    """Held-out examples as contexts, shortest first: ``prompts[k]`` (token ids) is context ``slots[k]
    = (example, choice)``, ``targets[k]`` the ids of its example's target; ``answers`` each example's
    right choice, ``sizes`` its number of choices, ``pad`` the pad token id."""

    prompts: list[list[int]]
    targets: list[list[int]]
    slots: list[tuple[int, int]]
    answers: list[int]
    sizes: list[int]
    pad: int
    headline: ClassVar[str] = "mc_accuracy"


def _contexts(ds) -> list[tuple[str, str]]:
    """``(context, target)`` of every choice of every example, in order.

    Raises
    ------
    UserError
        A question that is not one text with a blank ``_`` and text after it.
    """
    pairs = []
    for n, (text, row) in enumerate(zip(ds.texts, ds.choices, strict=True), 1):
        blank = text.find("_") if isinstance(text, str) else -1
        target = text[blank + 1:].strip() if blank >= 0 else ""
        if not target:
            raise UserError(f"--eval mc-partial fills each choice into its question's blank '_' and scores"
                            f" the text after it, and held-out question {n} has no blank with text after it:"
                            " use --eval mc, or give sentences with a '_' (Winogrande's)")
        pairs += [(text[:blank] + choice, " " + target) for choice in row]
    return pairs


def partial_set(tokenizer, ds, cfg) -> PartialSet:
    """The held-out examples ``ds`` as a :class:`PartialSet` (the module docstring).

    Raises
    ------
    UserError
        No choices, a question without a blank (:func:`_contexts`), or ``--fewshot``.
    """
    if ds.choices is None or ds.labels is None:
        raise UserError("--eval mc-partial needs choices for every held-out example: give a file with"
                        " question, choices and answer (--columns question=sentence,choices=option1+option2"
                        " for Winogrande's)")
    if cfg.fewshot:
        raise UserError("--eval mc-partial scores sentences, which take no --fewshot examples: drop"
                        " --fewshot")
    contexts, targets = encode_pairs(tokenizer, _contexts(ds))
    bos = leading_bos(tokenizer)
    contexts = [[bos, *c] if bos is not None else c for c in contexts]
    contexts = fit_prompts(contexts, [len(t) for t in targets], cfg.max_length, bos)
    slots = [(i, j) for i, row in enumerate(ds.choices) for j in range(len(row))]
    order = sorted(range(len(slots)), key=lambda k: len(contexts[k]))
    return PartialSet(prompts=[contexts[k] for k in order], targets=[targets[k] for k in order],
                      slots=[slots[k] for k in order], answers=list(ds.labels),
                      sizes=[len(row) for row in ds.choices], pad=tokenizer.pad_token_id)


@register_evaluation
class PartialChoice(Evaluation):
    """``--eval mc-partial``: each choice's context scored by the target after the blank (the module
    docstring)."""

    name = "mc-partial"

    def eval_set(self, task: Task, tokenizer, ds, cfg) -> PartialSet:
        return partial_set(tokenizer, ds, cfg)

    def scored(self, ds, cfg):
        return ds

    def evaluate(self, task: Task, fm, data: PartialSet, cfg) -> dict[str, float]:
        scores = [[0.0] * n for n in data.sizes]
        for start in range(0, len(data.prompts), cfg.eval_batch_size):
            end = start + cfg.eval_batch_size
            got = score_choices(fm, data.prompts[start:end], [[t] for t in data.targets[start:end]], data.pad)
            for (i, j), (score,) in zip(data.slots[start:end], got, strict=True):
                scores[i][j] = score
        lengths = {i: len(t) for (i, j), t in zip(data.slots, data.targets, strict=True) if j == 0}
        n = len(scores)
        acc = sum(first_best(row) == a for row, a in zip(scores, data.answers, strict=True)) / max(n, 1)
        nll = -sum(row[a] for row, a in zip(scores, data.answers, strict=True))
        mean = nll / max(sum(lengths.values()), 1)
        return {"accuracy": acc, "mc_accuracy": acc, "mc_accuracy_norm": acc, "loss": mean,
                "perplexity": math.exp(min(mean, 50.0)), "eval_examples": n}
