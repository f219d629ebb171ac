"""Supervised instruction tuning (``--task sft``): learn the responses, score generated answers.

An example is a prompt (a string, or a chat's earlier messages) and a response
(``fedlora.data.instructions``). It is rendered with the tokenizer's chat template: the
prompt with the assistant's turn opened (``add_generation_prompt``), then the
completion, which is the rest of the rendered conversation (the response and the
end of its turn). Tokens::

    input_ids = [prompt ids (cut from the left when too long) | completion ids | pad …]
    labels    = [-100 …                                       | completion ids | -100 …]

so the loss covers the response tokens only. A response longer than ``--max-length``
on its own is refused.

Evaluation, every round, on the held-out examples (``--eval-max`` caps them), is one of
the registered evaluations (``--eval``). ``generate`` (the default, :class:`Generate`) scores
both of these from one pass over each batch of left-padded prompts (``fedlora.tasks.decode``):

* the answers: greedy decoding of up to ``--max-new-tokens`` tokens from each prompt, scored
  by ``--metric`` (``fedlora.tasks.answers``); ``answer_accuracy`` (exact match) always;
* ``loss`` and ``perplexity``: the mean negative log-likelihood of the reference
  completion tokens (the response and the end of its turn), and its exponential.

``mc`` scores multiple-choice questions by their choices' log-likelihood
(``fedlora.tasks.choice``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora.data.columns import parse_columns
from fedlora.data.instructions import labeled_names, load_instructions
from fedlora.errors import UserError, say
from fedlora.tasks.answers import (
    ANSWER_METRICS,
    AnswerMetric,
    Exact,
    answer_metric,
    balanced_accuracy,
    normalize,
)
from fedlora.tasks.base import (
    EVALUATIONS,
    TRAIN,
    Evaluation,
    TokenLossTask,
    drop_long,
    length_advice,
    register_evaluation,
    register_task,
)
from fedlora.tasks.classic import columns
from fedlora.tasks.decode import score_and_generate
from fedlora.tasks.render import ChatFormat, encode_pairs, leading_bos

__all__ = ["SFT", "Generate", "GenerationSet", "normalize"]


@dataclass
class GenerationSet:
    """Held-out examples of an sft job, ready for :meth:`SFT.evaluate`, shortest prompt first:
    ``prompts`` and ``completions`` (token ids), ``answers`` (the reference responses),
    ``metric`` (how an answer is scored: ``--metric``, or its default for the data), ``closed_set``
    (the answers come from a closed set: label words, multiple-choice files)."""

    prompts: list[list[int]]
    completions: list[list[int]]
    answers: list[str]
    tokenizer: object
    max_new_tokens: int
    stop_ids: list[int] = field(default_factory=list)
    metric: AnswerMetric = field(default_factory=lambda: ANSWER_METRICS[Exact.name])
    closed_set: bool = False

    @property
    def headline(self) -> str:
        """The row column of the answers' metric (what ``accuracy`` is)."""
        return self.metric.column


def _stop_ids(tokenizer, *configs, completions: list[list[int]] = ()) -> list[int]:
    """Where a greedy answer stops: the tokenizer's end of text, the ``eos_token_id`` (one or a list)
    of each of ``configs`` (the model's config and generation config: Gemma's end of turn is only in
    the latter), and each special token that ends a reference completion (its template's end of turn):
    one of the tokenizer's named special tokens, or an added token marked special, as a template's
    end of turn often is without a name (decoding drops both kinds, ``skip_special_tokens``)."""
    ids = {tokenizer.eos_token_id}
    for config in configs:
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos])
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(getattr(tokenizer, "all_special_ids", ())) | {i for i, t in added.items()
                                                                if getattr(t, "special", False)}
    ids.update(c[-1] for c in completions if c and c[-1] in special)
    return sorted(i for i in ids if i is not None)


def cut_prompts(prompts: list[list[int]], room: list[int], max_length: int, bos: int | None = None
                ) -> tuple[list[list[int]], list[bool]]:
    """Each prompt cut from the left so that it and ``room[i]`` more tokens (its completion, or its
    longest choice) fit ``max_length``; and which prompts were cut.

    Parameters
    ----------
    prompts : list of list of int
        The prompts' token ids.
    room : list of int
        The tokens each prompt must leave free.
    max_length : int
        ``--max-length``.
    bos : int, optional
        The beginning-of-text id of a tokenizer that leads every text with it (:func:`leading_bos`):
        a prompt that starts with it keeps it, and loses the tokens after it instead (LLaMA, Mistral
        and Gemma read every text from it; one cut off would leave the model a text unlike any it
        saw), as long as one more token fits beside it.
    """
    out = []
    for p, r in zip(prompts, room, strict=True):
        fits = max(0, max_length - r)
        lead = p[:1] if bos is not None and p[:1] == [bos] and len(p) > fits >= 2 else []
        out.append(lead + p[len(p) - (fits - len(lead)):] if len(p) > fits else p)
    return out, [len(a) < len(b) for a, b in zip(out, prompts, strict=True)]


def warn_cut(cut: int, total: int, what: str, max_length: int, kept: str = "responses") -> None:
    """One warning counting the prompts :func:`cut_prompts` cut (none: nothing)."""
    if cut:
        say(f"{cut} of {total} {what} exceed --max-length {max_length}; their prompts were"
            f" cut from the left ({kept} kept)")


def train_labels(cfg, role: str) -> Callable[[], list[str]] | None:
    """For a file beside ``--data`` (``role``: ``--test-data``, ``--init-data``): the labels of
    ``--data`` read as a labeled file, which a labeled file's choices hold besides its own (read only
    if asked); else None."""
    if role == TRAIN or not cfg.data:
        return None
    return lambda: labeled_names(cfg.data, cfg.text_column, cfg.label_column, cfg.prompt_template)


@register_task
class SFT(TokenLossTask):
    """Instruction tuning: response-only loss, answers scored by greedy generation."""

    name = "sft"
    metric = "answer_accuracy"
    options = ("prompt_template", "label_words", "system_prompt", "chat_template", "max_new_tokens", "eval",
               "metric", "columns", "fewshot")
    datasets = ("bbcnews-instruct", "bbcnews")

    def load(self, spec: str, cfg, *, role: str = TRAIN):
        text, label = columns(cfg, role)
        return load_instructions(spec, text, label, cfg.prompt_template, cfg.label_words,
                                 train_labels(cfg, role), role, parse_columns(cfg.columns))

    length_from_data = True

    @staticmethod
    def tokenized(tokenizer, ds, cfg) -> tuple[list[list[int]], list[list[int]]]:
        """``(prompt ids, completion ids)`` of every example, uncut (``fedlora.tasks.render``)."""
        chat = ChatFormat(tokenizer, cfg.chat_template, cfg.system_prompt)
        pairs = [chat.split(p, r) for p, r in zip(ds.texts, ds.responses, strict=True)]
        return encode_pairs(tokenizer, pairs)

    def example_lengths(self, tokenizer, ds, cfg) -> tuple[list[int], list[int]]:
        """Tokens of each rendered example (prompt and completion), and of its completion (a
        prompt is cut to fit, a completion never)."""
        prompts, completions = self.tokenized(tokenizer, ds, cfg)
        totals = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
        return totals, [len(c) for c in completions]

    def pieces(self, tokenizer, ds, cfg, tokens: tuple | None = None
               ) -> tuple[list[list[int]], list[list[int]]]:
        """``(prompt ids, completion ids)`` of every example, prompts cut from the left to fit
        ``--max-length`` (one warning counts them); ``tokens``: :meth:`tokenized`'s, when known."""
        prompts, completions, cut = self.fitted(tokenizer, ds, cfg, tokens)
        warn_cut(sum(cut), len(ds), f"{self.name} examples", cfg.max_length)
        return prompts, completions

    def fitted(self, tokenizer, ds, cfg, tokens: tuple | None = None
               ) -> tuple[list[list[int]], list[list[int]], list[bool]]:
        """:meth:`pieces` without the warning, and which prompts were cut.

        Raises
        ------
        UserError
            A response alone is longer than ``--max-length`` (held-out rows are dropped before:
            :meth:`scorable`).
        """
        if cfg.max_length is None:
            raise ValueError("--task sft without --max-length: derive it first (resolve_max_length)")
        prompts, completions = tokens or self.tokenized(tokenizer, ds, cfg)
        longest = max(len(c) for c in completions)
        if longest >= cfg.max_length:  # a response needs a token of its prompt to be learnt from it
            n = sum(len(c) >= cfg.max_length for c in completions)
            raise UserError(f"{n} of {len(ds)} training responses alone have --max-length {cfg.max_length}"
                            f" tokens or more (the longest has {longest}), which leaves their prompts no"
                            f" token; {length_advice(tokenizer, longest)}")
        fit, cut = cut_prompts(prompts, [len(c) for c in completions], cfg.max_length,
                               leading_bos(tokenizer))
        return fit, completions, cut

    def scorable(self, tokenizer, ds, cfg) -> tuple[object, tuple[list[list[int]], list[list[int]]]]:
        """``(held-out ds, its tokenized pieces)`` without the examples whose response alone is
        longer than ``--max-length`` (:func:`drop_long`)."""
        prompts, completions = self.tokenized(tokenizer, ds, cfg)
        keep = drop_long([len(c) for c in completions], cfg, tokenizer, "response")
        if len(keep) == len(ds):
            return ds, (prompts, completions)
        return ds.subset(keep), ([prompts[i] for i in keep], [completions[i] for i in keep])

    def encode(self, tokenizer, ds, cfg) -> dict[str, Tensor]:
        return self._rows(tokenizer, *self.pieces(tokenizer, ds, cfg), cfg.max_length)

    @staticmethod
    def _rows(tokenizer, prompts, completions, width: int) -> dict[str, Tensor]:
        n = len(prompts)
        ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            row = p + c
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, len(p):len(row)] = torch.tensor(c)
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def eval_set(self, tokenizer, ds, cfg):
        """The held-out examples as ``--eval``'s evaluation takes them (a :class:`GenerationSet`
        for ``generate``)."""
        return EVALUATIONS[cfg.eval].eval_set(self, tokenizer, ds, cfg)

    def evaluate(self, fm, data, cfg) -> dict[str, float]:
        return EVALUATIONS[cfg.eval].evaluate(self, fm, data, cfg)

    def headline(self, data) -> str:
        return data.headline

    def generation_set(self, tokenizer, ds, cfg) -> GenerationSet:
        """The held-out examples ``ds`` for greedy answers, shortest prompt first (those whose
        response alone exceeds ``--max-length`` dropped: :meth:`scorable`)."""
        ds, tokens = self.scorable(tokenizer, ds, cfg)
        return self.answer_set(tokenizer, ds, *self.pieces(tokenizer, ds, cfg, tokens), cfg)

    @staticmethod
    def answer_set(tokenizer, ds, prompts: list[list[int]], completions: list[list[int]],
                   cfg) -> GenerationSet:
        """:meth:`generation_set` of ``ds`` from its fitted ``prompts`` and ``completions``."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        return GenerationSet(
            prompts=[prompts[i] for i in order], completions=[completions[i] for i in order],
            answers=[ds.responses[i] for i in order], tokenizer=tokenizer,
            stop_ids=_stop_ids(tokenizer, completions=completions),
            max_new_tokens=cfg.max_new_tokens or max(len(c) for c in completions),
            metric=answer_metric(cfg.metric, ds.choices is not None), closed_set=ds.choices is not None)

    def _batches(self, fm, data: GenerationSet, batch_size: int, limit: int | None = None):
        """``(reference nll (B,), reference tokens (B,), decoded greedy answers)`` per batch."""
        tok = data.tokenizer
        stops = sorted(set(data.stop_ids)
                       | set(_stop_ids(tok, fm.model.config, getattr(fm.model, "generation_config", None))))
        n = len(data.prompts) if limit is None else min(limit, len(data.prompts))
        for start in range(0, n, batch_size):
            end = min(n, start + batch_size)
            nll, count, greedy = score_and_generate(fm, data.prompts[start:end], data.completions[start:end],
                                                    data.max_new_tokens, stops, tok.pad_token_id)
            yield nll, count, tok.batch_decode(greedy, skip_special_tokens=True)

    def generate(self, fm, data: GenerationSet, batch_size: int, limit: int | None = None) -> list[str]:
        """Greedy answers of slot 0 to the first ``limit`` prompts (all by default), decoded."""
        return [a for _, _, answers in self._batches(fm, data, batch_size, limit) for a in answers]



@register_evaluation
class Generate(Evaluation):
    """``--eval generate``: greedy answers scored by ``--metric`` (and by exact match always, as
    ``answer_accuracy``; closed-set answers add ``answer_balanced_accuracy``), beside the reference
    responses' perplexity."""

    name = "generate"
    takes_metric = True

    def eval_set(self, task: SFT, tokenizer, ds, cfg) -> GenerationSet:
        return task.generation_set(tokenizer, self.scored(ds, cfg), cfg)

    def evaluate(self, task: SFT, fm, data: GenerationSet, cfg) -> dict[str, float]:
        loss = count = 0.0
        answers: list[str] = []
        for nll, tokens, batch in task._batches(fm, data, cfg.eval_batch_size):
            loss += float(nll.sum())
            count += float(tokens.sum())
            answers += batch
        scores = {m.column: m.mean(answers, data.answers) for m in (ANSWER_METRICS[Exact.name], data.metric)}
        if data.closed_set:
            scores["answer_balanced_accuracy"] = balanced_accuracy(answers, data.answers)
        mean = loss / max(count, 1.0)
        return {"accuracy": scores[data.headline], **scores, "loss": mean,
                "perplexity": math.exp(min(mean, 50.0)), "eval_examples": len(answers)}
