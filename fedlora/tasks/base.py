"""What a task is, and the pieces every task shares: collation and token losses.

A :class:`Task` owns everything that differs between fine-tuning jobs: which data it
reads, how it tokenizes, which model class and PEFT task type it uses, its loss and its
evaluation metrics. Training, DP-SGD, the simulator and deployment call these methods
and never branch on a task's name. A task is registered where it is defined
(:func:`register_task`), like a strategy.

Batches are dicts of tensors whose rows are examples. Token tensors are stored right-padded
to ``--max-length``; :func:`gather_rows` takes the rows of a pass and cuts the columns past
its longest row (dynamic padding), so a pass of short phrases costs what its tokens cost.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlora.errors import UserError, say
from fedlora.models.context import tokenizer_context
from fedlora.tasks.fewshot import with_shots

#: Which file :meth:`Task.load` reads, named by its column flags' prefix: ``--data`` (``--text-column``),
#: ``--test-data`` (``--test-text-column``), or a public file, ``--init-data`` or ``--quant-calibration``
#: (``--init-text-column``).
TRAIN, TEST, INIT = "", "test-", "init-"
#: name -> task object (filled by :func:`register_task`).
TASKS: dict[str, Task] = {}
#: ``--eval`` name -> how a task that answers prompts scores them (:func:`register_evaluation`).
EVALUATIONS: dict[str, Evaluation] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls()
    return cls


def register_evaluation(cls: type[Evaluation]) -> type[Evaluation]:
    """Class decorator: register one instance of ``cls`` under ``cls.name`` (an ``--eval`` value)."""
    if cls.name in EVALUATIONS:
        raise ValueError(f"evaluation {cls.name!r} is registered twice")
    EVALUATIONS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; use one of {', '.join(sorted(TASKS))}") from None


def gather_rows(data: dict[str, Tensor], idx: list[int], device: torch.device,
                pad_to_longest: bool = True) -> dict[str, Tensor]:
    """Rows ``idx`` of every tensor in ``data``, on ``device``.

    With ``pad_to_longest`` the token columns (every 2-D tensor as wide as
    ``input_ids``) are cut after the longest selected row, which is where its
    ``attention_mask`` ends (rows are right-padded). An example of several rows (DPO's pair:
    ``(N, 2, T)`` token tensors) is cut the same way along its last dimension.
    """
    index = torch.as_tensor(idx, dtype=torch.long)
    out = {k: v.index_select(0, index) for k, v in data.items()}
    mask = out.get("attention_mask")
    if pad_to_longest and mask is not None and mask.numel():
        width = mask.shape[-1]
        longest = max(1, int(mask.sum(dim=-1).max()))
        if longest < width:
            out = {k: v[..., :longest] if v.dim() == mask.dim() and v.shape[-1] == width else v
                   for k, v in out.items()}
    return {k: v.to(device) for k, v in out.items()}


def length_groups(lengths: Tensor, max_groups: int = 8, pass_cost: float = 0.1) -> list[Tensor] | None:
    """Micro-batches of rows of similar length: row indices sorted by length, in G equal-count
    groups, each padded to its own longest row.

    G minimises the padded tokens ``Σ_g |g| · max(g)``, each pass beyond the first priced at
    ``pass_cost`` of the total (a pass has a fixed cost); None when one pass of every row is
    cheapest (rows of similar lengths, e.g. BBC News cut at --max-length).
    """
    n = lengths.numel()
    order = torch.argsort(lengths, stable=True)
    ranked = lengths[order].tolist()
    best_cost, best = float(n * max(ranked, default=0)), None
    for g in range(2, min(max_groups, n) + 1):
        bounds = [n * i // g for i in range(g + 1)]
        padded = sum((b - a) * ranked[b - 1] for a, b in zip(bounds, bounds[1:], strict=False) if b > a)
        cost = padded * (1 + pass_cost * (g - 1))
        if cost < best_cost:
            best_cost = cost
            best = [order[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    return best


def row_groups(data: dict[str, Tensor], rows: Tensor, pad_to_longest: bool) -> list[Tensor] | None:
    """The passes of a step over ``rows``: under dynamic padding with an attention mask,
    :func:`length_groups` of the rows' lengths (positions into ``rows``), else None (one pass).
    The non-private and the DP step both group this way."""
    if not pad_to_longest or "attention_mask" not in data:
        return None
    lengths = data["attention_mask"][rows].sum(dim=-1)            # (N,), or (N, rows of an example)
    return length_groups(lengths.reshape(len(rows), -1).amax(dim=1))


def token_losses(logits: Tensor, labels: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Next-token losses: ``(loss (N, P), valid (N, P))``; -100 marks tokens without loss.

    Token t+1 is predicted from tokens ≤ t. ``logits`` are every position's ``(N, T, V)``
    (then P = T-1), or those of ``positions`` only, ``(N, P, V)``.
    """
    if positions is None:
        lg, lb = logits[:, :-1].float(), labels[:, 1:]
    else:
        lg, lb = logits.float(), labels[:, positions + 1]
    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), reduction="none",
                          ignore_index=-100).view(lb.shape)                  # (N, P)
    return tok, (lb != -100).float()


def held_out_source(cfg) -> str:
    """Where held-out examples come from, as a warning names it."""
    return f"--test-data {cfg.test_data}" if cfg.test_data else "the held-out split of --data"


def length_advice(tokenizer, longest: int) -> str:
    """What lets a text of ``longest`` tokens fit: a larger ``--max-length`` where the model (its
    positions and its tokenizer's ``model_max_length``: :func:`~fedlora.models.hub.tokenizer_context`)
    takes one, else shortening or dropping it."""
    limit = tokenizer_context(tokenizer)
    if limit is not None and longest >= limit:
        return f"this model takes at most {limit} tokens: shorten or drop those rows"
    most = f" (this model takes up to {limit})" if limit else ""
    return f"pass a --max-length above {longest}{most}, or shorten or drop those rows"


def drop_long(lengths: list[int], cfg, tokenizer, what: str) -> list[int]:
    """The positions of the held-out examples whose ``what`` (``lengths[i]`` tokens, which no cut
    shortens) leaves room in ``--max-length`` for a token of the prompt: the others cannot be scored
    (the first token would be predicted from no prompt at all), and are skipped with one warning.

    Raises
    ------
    UserError
        None fits.
    """
    keep = [i for i, n in enumerate(lengths) if n < cfg.max_length]
    if len(keep) == len(lengths):
        return keep
    longest, source = max(lengths), held_out_source(cfg)
    if not keep:
        raise UserError(f"every held-out example ({len(lengths)}, {source}) has a {what} of --max-length"
                        f" {cfg.max_length} tokens or more alone (the longest has {longest} tokens), which"
                        " leaves no token of the prompt, so none can be scored;"
                        f" {length_advice(tokenizer, longest)}")
    say(f"{len(lengths) - len(keep)} of {len(lengths)} held-out examples ({source}) have a {what}"
        f" of --max-length {cfg.max_length} tokens or more alone (the longest has {longest} tokens), which"
        " leaves no token of the prompt; they are not scored")
    return keep


class Task(ABC):
    """One kind of fine-tuning job (see the module docstring).

    Attributes
    ----------
    name : str
        The ``--task`` value.
    model_kind : str
        ``"sequence-classification"`` or ``"causal-lm"``: the transformers model class.
    peft_task_type : str
        The exported adapter's PEFT task type.
    trains_head : bool
        Clients train (and the server averages) the classification head.
    classes : bool
        Its labels are classes, numbered by the label names of ``--data``: other files' labels are
        renumbered to them, and an export records them (a classifier's); a regression's are scores.
    problem_type : str or None
        The head's ``problem_type`` in the model's config (transformers' name), where it sets one.
    metric : str
        Name of the round's headline metric (a row's ``accuracy``).
    options : tuple of str
        The job fields only this task reads (another task's job refuses them when set).
    datasets : tuple of str
        The built-in ``--data`` names it reads (besides files).
    length_from_data : bool
        Without ``--max-length``, the job's is derived from the training data
        (:meth:`example_lengths`, :func:`fedlora.job.setup.resolve_max_length`); else it is 64.
    rows_per_example : int
        Model rows of one example, adjacent in a pass (DPO: 2, a pair's chosen and rejected
        responses); a per-example gradient (DP-SGD) sums over them.
    opacus : bool
        Opacus' DP-SGD can train it (its per-sample gradients are per model row).
    """

    name: ClassVar[str]
    model_kind: ClassVar[str] = "causal-lm"
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    trains_head: ClassVar[bool] = False
    classes: ClassVar[bool] = False
    problem_type: ClassVar[str | None] = None
    metric: ClassVar[str] = "accuracy"
    options: ClassVar[tuple[str, ...]] = ()
    datasets: ClassVar[tuple[str, ...]] = ("bbcnews",)
    length_from_data: ClassVar[bool] = False
    rows_per_example: ClassVar[int] = 1
    opacus: ClassVar[bool] = True

    @abstractmethod
    def load(self, spec: str, cfg, *, role: str = TRAIN):
        """The examples of ``spec`` as a ``TextDataset``: ``--data``, or with ``role`` ``"test-"`` /
        ``"init-"`` ``--test-data`` / ``--init-data``, read by their own column flags
        (:func:`fedlora.tasks.classic.columns`)."""

    @abstractmethod
    def encode(self, tokenizer, ds, cfg) -> dict[str, Tensor]:
        """Training tensors of ``ds``: ``input_ids``, ``attention_mask``, ``labels``, …"""

    def head_outputs(self, num_labels: int) -> int | None:
        """The outputs of the task head for data of ``num_labels`` classes (the model config's
        ``num_labels``), or None: a model without one."""
        return None

    def prepare(self, fm, data: Any, cfg) -> None:
        """Complete :meth:`encode`'s or :meth:`eval_set`'s ``data`` with what it needs from the
        untrained model, once, where the job is set up (before any round): nothing, but for DPO
        (its reference log-probabilities)."""
        return None

    def model_inputs(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Any]:
        """``(the model's inputs, the targets the loss reads)`` of a batch from :func:`gather_rows`
        (``batch`` is consumed): the labels popped, for every task but DPO."""
        labels = batch.pop("labels")
        return batch, labels

    def example_lengths(self, tokenizer, ds, cfg) -> tuple[list[int], list[int]]:
        """``(tokens of each example, tokens of its part that no cut may shorten)``, uncut: what a
        ``--max-length`` derived from the data is read from (:attr:`length_from_data`)."""
        raise NotImplementedError(f"--task {self.name} does not derive --max-length from the data")

    def eval_set(self, tokenizer, ds, cfg) -> Any:
        """What :meth:`evaluate` takes: the encoded held-out rows, longest first (so that
        an evaluation batch pads little)."""
        data = self.encode(tokenizer, ds, cfg)
        order = torch.argsort(data["attention_mask"].sum(dim=1), descending=True, stable=True)
        return {k: v.index_select(0, order) for k, v in data.items()}

    @abstractmethod
    def loss_counts(self, labels: Tensor) -> Tensor:
        """``(N,)``: how many loss terms each example has (1, or its labeled tokens), known
        before the forward pass (a client's loss is the mean over its batch's terms)."""

    @abstractmethod
    def loss_sums(self, logits: Tensor, labels: Tensor, positions: Tensor | None = None) -> Tensor:
        """``(N,)``: each example's summed loss terms (``logits`` of ``positions`` only when given,
        see :meth:`logit_positions`)."""

    def logit_positions(self, labels: Tensor) -> Tensor | None:
        """The sequence positions whose logits the loss reads, or None (all, or no sequence)."""
        return None

    def row_losses(self, logits: Tensor, labels: Tensor, positions: Tensor | None = None) -> Tensor:
        """``(N,)``: each example's own mean loss (DP-SGD clips per example)."""
        return self.loss_sums(logits, labels, positions) / self.loss_counts(labels).clamp_min(1.0)

    def client_losses(self, logits: Tensor, labels: Tensor, n_seg: int) -> Tensor:
        """``(S,)``: the mean loss of each of ``n_seg`` equal contiguous row segments, over all
        the loss terms of the segment."""
        sums = self.loss_sums(logits, labels).view(n_seg, -1).sum(dim=1)
        return sums / self.loss_counts(labels).view(n_seg, -1).sum(dim=1).clamp_min(1.0)

    @abstractmethod
    def evaluate(self, fm, data: Any, cfg) -> dict[str, float]:
        """Metrics of slot 0 of ``fm`` on :meth:`eval_set`'s ``data``: at least
        ``accuracy`` (the headline, :meth:`headline`), ``loss`` and ``eval_examples``."""

    def headline(self, data: Any) -> str:
        """The name of what ``accuracy`` measures on :meth:`eval_set`'s ``data`` (a row's ``metric``)."""
        return self.metric


class Evaluation(ABC):
    """How a task that answers prompts (``--task sft``) scores its held-out examples: one
    registered object per ``--eval`` value (:func:`register_evaluation`).

    Attributes
    ----------
    name : str
        The ``--eval`` value.
    takes_metric : bool
        Whether ``--metric`` (how a generated answer is scored) applies.
    """

    name: ClassVar[str]
    takes_metric: ClassVar[bool] = False

    @abstractmethod
    def eval_set(self, task: Task, tokenizer, ds, cfg) -> Any:
        """What :meth:`evaluate` takes: the held-out examples ``ds``, encoded. Its ``headline``
        attribute names the metric its ``accuracy`` is."""

    @abstractmethod
    def evaluate(self, task: Task, fm, data: Any, cfg) -> dict[str, float]:
        """The metrics of slot 0 of ``fm`` on ``data``, as :meth:`Task.evaluate`."""

    def scored(self, ds, cfg):
        """The held-out examples ``ds`` with the prompts and answers this evaluation scores (what a
        ``--max-length`` derived from them must hold): each prompt led by ``--fewshot`` solved
        examples (:func:`~fedlora.tasks.fewshot.with_shots`), and rewritten where an evaluation
        rewrites it (``mc-letters`` lists the choices in the prompt)."""
        return with_shots(ds, cfg.fewshot, cfg.seed)


class TokenLossTask(Task):
    """A task whose loss is next-token cross-entropy over the tokens with a label (a client's
    loss is token-weighted: every labeled token of its batch counts once)."""

    def loss_counts(self, labels: Tensor) -> Tensor:
        return (labels[:, 1:] != -100).sum(dim=1).float()

    def logit_positions(self, labels: Tensor) -> Tensor:
        """Positions t with a labeled token t+1 in any row: a response's, for sft (a vocabulary-wide
        logit row per prompt token would be computed, kept for the backward pass, and unused)."""
        return (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()

    def loss_sums(self, logits: Tensor, labels: Tensor, positions: Tensor | None = None) -> Tensor:
        tok, valid = token_losses(logits, labels, positions)
        return (tok * valid).sum(dim=1)
