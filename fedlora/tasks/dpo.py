"""Direct Preference Optimization (``--task dpo``) over the clients' LoRA adapters.

An example is a preference pair (``fedlora.data.preferences``): a prompt, a chosen and a
rejected response. Each response is rendered and tokenized as ``--task sft`` renders its
response (:class:`~fedlora.tasks.sft.SFT`: chat template, prompt cut from the left), and the
pair is stored as ``(N, 2, T)`` token tensors (row 0 chosen, row 1 rejected), so that a batch
never splits a pair; the model sees a pass's pairs as adjacent rows (:attr:`rows_per_example`).

With ``log π(y)`` the summed log-probability of a response's tokens (its completion: the
response and the end of its turn) under the client's model, and ``log π_ref(y)`` the same under
the base model with every adapter off, the implicit reward of a response is
``r(y) = β (log π(y) − log π_ref(y))`` (``--dpo-beta``), and a pair's loss is

    ℓ = −log σ(r(chosen) − r(rejected))  [ + α · (−log π(chosen)) / |chosen| ].

The bracketed term (``--dpo-sft-weight`` α, default 0: plain DPO) is the chosen completion's
negative log-likelihood per token, as in RPO (Pang et al. 2024, "Iterative Reasoning Preference
Optimization"; TRL's ``rpo_alpha``): DPO alone only ranks the chosen response above the rejected
one, and can lower both, so a model that does not already answer in the data's format is not
taught it; the NLL term teaches it.

The reference log-probabilities are computed once per example where the job is set up
(:meth:`DPO.prepare`: the same batched model with every adapter switched off, before any
round and any fold), kept in the encoded data (``ref_logps``) and never trained. DP-SGD clips
each pair's gradient (the per-example loss is the pair's ``ℓ``).

Held-out pairs are scored by ``reward_accuracy`` (the share of pairs whose chosen response's
reward beats the rejected one's), ``reward_margin`` (the mean of ``r(chosen) − r(rejected)``)
and ``loss``; label-word (or multiple-choice) data adds ``answer_accuracy``, the exact match of
greedy answers (as ``--task sft``), which is then the headline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlora.data.columns import parse_columns
from fedlora.data.loading import TextDataset
from fedlora.data.preferences import PairDataset, load_preferences
from fedlora.kernels import Routing
from fedlora.models.lora import adapters_off
from fedlora.tasks.answers import ANSWER_METRICS, Exact
from fedlora.tasks.base import TRAIN, drop_long, gather_rows, register_task, token_losses
from fedlora.tasks.classic import columns
from fedlora.tasks.sft import SFT, GenerationSet, train_labels, warn_cut

__all__ = ["DPO", "PairTargets", "PreferenceSet", "pair_logps", "pair_sums"]

#: The encoded pairs' cached reference log-probabilities, ``(N, 2)``.
REF = "ref_logps"
#: The encoded pairs' β, ``(N,)`` (the loss reads it from the batch).
BETA = "dpo_beta"
#: The encoded pairs' α, ``(N,)``: the weight of the chosen completion's per-token NLL.
ALPHA = "dpo_sft_weight"


@dataclass
class PairTargets:
    """What a pass's DPO loss reads besides the logits: ``labels`` ``(2n, T)`` (the pairs' rows,
    chosen then rejected; -100 off the completions), ``ref`` ``(n, 2)`` reference log-probabilities
    (None while they are being computed), ``beta`` ``(n,)`` and ``alpha`` ``(n,)`` (the NLL term's
    weight; None: 0)."""

    labels: Tensor
    ref: Tensor | None
    beta: Tensor
    alpha: Tensor | None = None


@dataclass
class PreferenceSet:
    """Held-out pairs for :meth:`DPO.evaluate`: ``pairs`` (encoded, longest first) and, for
    label-word data, ``answers`` (the prompts, for greedy answers scored by exact match)."""

    pairs: dict[str, Tensor]
    answers: GenerationSet | None = None

    @property
    def headline(self) -> str:
        return "answer_accuracy" if self.answers is not None else DPO.metric


def pair_sums(logits: Tensor, labels: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(log-probabilities, counts)``, each ``(n, 2)``: every row's summed log-probability of its
    labeled tokens and its number of labeled tokens, two rows a pair."""
    tok, valid = token_losses(logits, labels, positions)
    return -(tok * valid).sum(dim=1).view(-1, 2), valid.sum(dim=1).view(-1, 2)


def pair_logps(logits: Tensor, labels: Tensor, positions: Tensor | None = None) -> Tensor:
    """``(n, 2)``: each row's summed log-probability of its labeled tokens (:func:`pair_sums`)."""
    return pair_sums(logits, labels, positions)[0]


def _views(ds: PairDataset) -> tuple[TextDataset, TextDataset]:
    """The pairs as two instruction datasets: prompts with the chosen, and with the rejected responses."""
    return (TextDataset(ds.texts, ds.labels, ds.label_names, ds.responses),
            TextDataset(ds.texts, ds.labels, ds.label_names, ds.rejected))


@register_task
class DPO(SFT):
    """Preference tuning: the DPO loss per pair, against the base model's cached log-probabilities."""

    name = "dpo"
    metric = "reward_accuracy"
    options = ("prompt_template", "label_words", "system_prompt", "chat_template", "max_new_tokens",
               "dpo_beta", "dpo_sft_weight", "columns")
    rows_per_example = 2
    opacus = False

    def load(self, spec: str, cfg, *, role: str = TRAIN) -> PairDataset:
        text, label = columns(cfg, role)
        return load_preferences(spec, text, label, cfg.prompt_template, cfg.label_words, cfg.seed,
                                train_labels(cfg, role), role, parse_columns(cfg.columns))

    def example_lengths(self, tokenizer, ds: PairDataset, cfg) -> tuple[list[int], list[int]]:
        """A pair's longer row, and its longer completion."""
        (ta, ma), (tb, mb) = (super(DPO, self).example_lengths(tokenizer, v, cfg) for v in _views(ds))
        return list(map(max, ta, tb)), list(map(max, ma, mb))

    def fitted_views(self, tokenizer, ds: PairDataset, cfg, tokens: list | None = None
                     ) -> list[tuple[list, list, list[bool]]]:
        """:meth:`fitted` of the chosen and the rejected view (of their :meth:`tokenized` ``tokens``
        when given), with one warning counting the pairs whose prompt was cut in either."""
        tokens = tokens or [None, None]
        views = [self.fitted(tokenizer, v, cfg, t) for v, t in zip(_views(ds), tokens, strict=True)]
        warn_cut(sum(map(max, views[0][2], views[1][2])), len(ds), "dpo pairs", cfg.max_length)
        return views

    def encode(self, tokenizer, ds: PairDataset, cfg, views: list | None = None) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` ``(N, 2, T)``, ``dpo_beta`` and
        ``dpo_sft_weight`` ``(N,)`` (from ``views``, :meth:`fitted_views`, when given); the reference
        log-probabilities are added by :meth:`prepare`."""
        views = views or self.fitted_views(tokenizer, ds, cfg)
        chosen, rejected = (self._rows(tokenizer, p, c, cfg.max_length) for p, c, _ in views)
        out = {k: torch.stack([chosen[k], rejected[k]], dim=1) for k in chosen}
        out[BETA] = torch.full((len(ds),), float(cfg.dpo_beta))
        out[ALPHA] = torch.full((len(ds),), float(cfg.dpo_sft_weight))
        return out

    def prepare(self, fm, data, cfg) -> None:
        """The reference log-probabilities of ``data``'s pairs (``ref_logps``), once: slot 0 of
        ``fm`` with every adapter off."""
        pairs = data.pairs if isinstance(data, PreferenceSet) else data
        if REF not in pairs:
            with adapters_off(fm.adapters.values()):
                pairs[REF] = self.logps(fm, pairs, cfg)

    def model_inputs(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], PairTargets]:
        """The pairs' rows for the model, ``(2n, T)``, each pair's two adjacent; and their targets."""
        inputs = {k: batch.pop(k).flatten(0, 1) for k in ("input_ids", "attention_mask")}
        return inputs, PairTargets(batch.pop("labels").flatten(0, 1), batch.pop(REF, None), batch.pop(BETA),
                                   batch.pop(ALPHA, None))

    def logit_positions(self, labels: PairTargets) -> Tensor:
        return super().logit_positions(labels.labels)

    def loss_counts(self, labels: Tensor) -> Tensor:
        return torch.ones(labels.shape[0], device=labels.device)

    @staticmethod
    def margins_nll(logits: Tensor, targets: PairTargets, positions: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
        """``(margins, nll)``, each ``(n,)``: every pair's ``r(chosen) − r(rejected)``, and its chosen
        completion's negative log-likelihood per token."""
        if targets.ref is None:
            raise ValueError("DPO pairs without reference log-probabilities: call DPO.prepare first")
        logp, count = pair_sums(logits, targets.labels, positions)
        rel = logp - targets.ref.to(logits.device)
        margin = targets.beta.to(logp) * (rel[:, 0] - rel[:, 1])
        return margin, -logp[:, 0] / count[:, 0].clamp(min=1)

    def margins(self, logits: Tensor, targets: PairTargets, positions: Tensor | None = None) -> Tensor:
        """``(n,)``: ``r(chosen) − r(rejected)`` of each pair (:meth:`margins_nll`)."""
        return self.margins_nll(logits, targets, positions)[0]

    def loss_sums(self, logits: Tensor, labels: PairTargets, positions: Tensor | None = None) -> Tensor:
        """Each pair's ``ℓ`` (the module docstring), the NLL term included when ``α > 0``."""
        margin, nll = self.margins_nll(logits, labels, positions)
        loss = -F.logsigmoid(margin)
        return loss if labels.alpha is None else loss + labels.alpha.to(loss) * nll

    def row_losses(self, logits: Tensor, labels: PairTargets, positions: Tensor | None = None) -> Tensor:
        return self.loss_sums(logits, labels, positions)

    def _passes(self, fm, pairs: dict[str, Tensor], cfg):
        """``(logits, targets, positions)`` of slot 0, ``--eval-batch-size`` pairs at a time, no gradient."""
        device = next(fm.parameters()).device
        n = pairs["input_ids"].shape[0]
        for start in range(0, n, cfg.eval_batch_size):
            batch = gather_rows(pairs, list(range(start, min(n, start + cfg.eval_batch_size))), device,
                                cfg.padding == "longest")
            inputs, targets = self.model_inputs(batch)
            positions = self.logit_positions(targets)
            slot = torch.zeros(1, dtype=torch.long, device=device)
            routing = Routing.segments(slot, targets.labels.shape[0])
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=cfg.precision == "bf16"):
                yield fm(routing=routing, positions=positions, **inputs).logits, targets, positions

    def logps(self, fm, pairs: dict[str, Tensor], cfg) -> Tensor:
        """``(N, 2)``: slot 0's log-probabilities of every pair's chosen and rejected completion (CPU)."""
        return torch.cat([pair_logps(lg, t.labels, p).cpu() for lg, t, p in self._passes(fm, pairs, cfg)])

    def eval_set(self, tokenizer, ds: PairDataset, cfg) -> PreferenceSet:
        """Held-out pairs, and for label-word data the chosen view's prompts (already fitted: tokenized
        and cut once, with one warning) for greedy answers. Pairs with a response longer than
        ``--max-length`` alone are not scored (one warning counts them)."""
        tokens = [self.tokenized(tokenizer, v, cfg) for v in _views(ds)]
        keep = drop_long(list(map(max, *([len(c) for c in t[1]] for t in tokens))), cfg, tokenizer,
                         "response (chosen or rejected)")
        if len(keep) < len(ds):
            ds = ds.subset(keep)
            tokens = [([p[i] for i in keep], [c[i] for i in keep]) for p, c in tokens]
        views = self.fitted_views(tokenizer, ds, cfg, tokens)
        pairs = self.encode(tokenizer, ds, cfg, views)
        order = torch.argsort(pairs["attention_mask"].sum(dim=-1).amax(dim=1), descending=True, stable=True)
        answers = self.answer_set(tokenizer, ds, *views[0][:2], cfg) if ds.choices is not None else None
        return PreferenceSet({k: v.index_select(0, order) for k, v in pairs.items()}, answers)

    def evaluate(self, fm, data: PreferenceSet, cfg) -> dict[str, float]:
        margin = torch.cat([self.margins(lg, t, p).float().cpu()
                            for lg, t, p in self._passes(fm, data.pairs, cfg)])
        out = {"reward_accuracy": float((margin > 0).float().mean()), "reward_margin": float(margin.mean()),
               "loss": float(-F.logsigmoid(margin).mean()), "eval_examples": int(margin.numel())}
        if data.answers is not None:
            answers = self.generate(fm, data.answers, cfg.eval_batch_size)
            out["answer_accuracy"] = ANSWER_METRICS[Exact.name].mean(answers, data.answers.answers)
        return {"accuracy": out[data.headline], **out}

    def headline(self, data: PreferenceSet) -> str:
        return data.headline
