"""How a generated answer is scored against the reference (``--metric``): one registered object
per metric.

* ``exact``: the normalized answer equals the normalized reference (:func:`normalize`:
  lower case, single spaces, no surrounding punctuation, brackets or markdown emphasis: ``(B)``,
  ``**positive**``); a row's ``answer_accuracy``;
* ``contains``: the normalized reference appears in the normalized answer as whole words:
  "positive" is found in "the review is positive", but "no" not in "i do not know", "yes" not in
  "yesterday" and "4" not in "14"; ``answer_contains``;
* ``number``: the answer's final number equals the reference's (GSM8K's ``… #### 72``): each
  side's number after its last ``####``, else its last number, compared as numbers (``1,080``,
  ``$72`` and ``72.0`` are 1080, 72 and 72); an answer without a number scores 0;
  ``answer_number``;
* ``rouge-l``: ROUGE-L F1 (Lin 2004) from the ``rouge-score`` package: the longest common
  subsequence of the two token lists, ``F = 2PR / (P + R)`` with ``P = LCS / len(answer)`` and
  ``R = LCS / len(reference)``; rouge-score's tokens are lower-cased runs of ASCII letters and
  digits, so text in other scripts scores 0. ``rouge_l``.

The default (``auto``) is ``exact`` for closed-set answers (label words, multiple-choice files)
and ``rouge-l`` for free-form responses. Closed-set answers also get :func:`balanced_accuracy`
(``answer_balanced_accuracy``): the exact-match rate of each reference answer, averaged over the
answers, so a model that gives one label to every question scores ``1 / labels`` however the labels
are mixed (what a skewed federation's bias shows as).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from functools import cached_property
from typing import ClassVar

#: What :func:`normalize` strips around an answer: spaces, ASCII punctuation, brackets and markdown
#: emphasis, and their typographic and full-width forms (curly quotes, guillemets, CJK brackets and stops).
_PUNCT = " \t\n.!?,;:'\"`*_()[]" "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2039\u203a\u201e\u201a\u2026" \
         "\u300c\u300d\u300e\u300f\u3010\u3011\u3002\u3001\uff08\uff09\uff0c\uff0e\uff01\uff1f\uff1a\uff1b"

#: name -> metric (filled by :func:`register_answer_metric`).
ANSWER_METRICS: dict[str, AnswerMetric] = {}
#: ``--metric``'s default: chosen from the data by :func:`answer_metric`.
AUTO = "auto"


def normalize(text: str) -> str:
    """An answer as it is compared: lower case, single spaces, no surrounding punctuation (brackets
    and markdown's ``*``/``_`` too, curly quotes and full-width stops: :data:`_PUNCT`)."""
    return " ".join(text.lower().split()).strip(_PUNCT)


def register_answer_metric(cls: type[AnswerMetric]) -> type[AnswerMetric]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.name in ANSWER_METRICS:
        raise ValueError(f"answer metric {cls.name!r} is registered twice")
    ANSWER_METRICS[cls.name] = cls()
    return cls


def answer_metric(name: str, closed_set: bool) -> AnswerMetric:
    """The metric ``--metric NAME`` selects; ``auto``: exact for ``closed_set`` answers, else ROUGE-L."""
    if name == AUTO:
        name = Exact.name if closed_set else RougeL.name
    return ANSWER_METRICS[name]


class AnswerMetric(ABC):
    """One way to score an answer.

    Attributes
    ----------
    name : str
        The ``--metric`` value.
    column : str
        The metric row's column of its mean over the examples.
    """

    name: ClassVar[str]
    column: ClassVar[str]

    @abstractmethod
    def score(self, answer: str, reference: str) -> float:
        """The answer's score in [0, 1]."""

    def mean(self, answers: list[str], references: list[str]) -> float:
        """The mean score of ``answers`` against ``references`` (0 for none)."""
        scores = [self.score(a, r) for a, r in zip(answers, references, strict=True)]
        return sum(scores) / max(len(scores), 1)


@register_answer_metric
class Exact(AnswerMetric):
    name, column = "exact", "answer_accuracy"

    def score(self, answer: str, reference: str) -> float:
        return float(normalize(answer) == normalize(reference))


def balanced_accuracy(answers: list[str], references: list[str]) -> float:
    """The mean over the distinct (normalized) references of their answers' :class:`Exact` score:
    the mean per-class recall; 0 for no answers."""
    exact = ANSWER_METRICS[Exact.name]
    scores: dict[str, list[float]] = {}
    for answer, reference in zip(answers, references, strict=True):
        scores.setdefault(normalize(reference), []).append(exact.score(answer, reference))
    return sum(sum(s) / len(s) for s in scores.values()) / max(len(scores), 1)


@register_answer_metric
class Contains(AnswerMetric):
    name, column = "contains", "answer_contains"

    def score(self, answer: str, reference: str) -> float:
        said = normalize(reference)
        if not said:
            return 0.0
        # a word boundary where the reference begins or ends with an ASCII letter or digit ("no" is not
        # in "not"); none in scripts written without spaces ("东京" is in "答案是东京")
        head = r"(?<![A-Za-z0-9])" if re.match(r"[A-Za-z0-9]", said) else ""
        tail = r"(?![A-Za-z0-9])" if re.match(r"[A-Za-z0-9]", said[-1]) else ""
        return float(re.search(head + re.escape(said) + tail, normalize(answer)) is not None)


#: A number as answers write it: a sign ("-", or the minus sign "−") where no word runs into it (a
#: date's "-05" is 5), digits with commas only as thousands separators ("1,080" is 1080; "1,2,3" is
#: three numbers), a decimal part; or a decimal part alone (".5" is 0.5, "$.75" 0.75).
_NUMBER = re.compile(r"(?:(?<!\w)[-\u2212])?(?:(?<!\d)(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
                     r"|(?<![\w.])\.\d+)")


def final_number(text: str) -> float | None:
    """The number ``text`` ends its answer with: the first after its last ``####`` (GSM8K's mark), else
    its last number; None without one."""
    head, mark, tail = text.rpartition("####")
    found = _NUMBER.findall(tail) if mark else []
    found = found[:1] if found else _NUMBER.findall(text)[-1:]
    if not found:
        return None
    try:
        return float(found[0].replace(",", "").replace("\u2212", "-"))
    except ValueError:
        return None


@register_answer_metric
class FinalNumber(AnswerMetric):
    name, column = "number", "answer_number"

    def score(self, answer: str, reference: str) -> float:
        want, got = final_number(reference), final_number(answer)
        return float(want is not None and got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want)))


@register_answer_metric
class RougeL(AnswerMetric):
    name, column = "rouge-l", "rouge_l"

    @cached_property
    def scorer(self):
        """rouge-score's scorer, imported on first use: the package imports nltk (seconds)."""
        from rouge_score.rouge_scorer import RougeScorer

        return RougeScorer(["rougeL"])

    def score(self, answer: str, reference: str) -> float:
        return float(self.scorer.score(reference, answer)["rougeL"].fmeasure)
