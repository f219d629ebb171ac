"""Regression: one score per text or pair of texts (GLUE's STS-B, a similarity of 0 to 5), fitted by a
one-output head (``problem_type="regression"``) with the squared error; scored by Pearson's and
Spearman's correlations, as FedEx-LoRA and Fed-SB report STS-B."""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.data.loading import TextDataset
from fedlora.tasks.base import register_task
from fedlora.tasks.classic import HeadTask, eval_batches


def average_ranks(x: Tensor) -> Tensor:
    """Each value's rank in ``x`` (1 for the smallest), tied values sharing the mean of their ranks:
    ``[10, 20, 20, 5]`` ranks ``[2, 3.5, 3.5, 1]``."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).to(torch.float64)               # the rank of each value's last copy
    return (last - (counts - 1) / 2)[inverse]


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson's correlation ``Σ (x-x̄)(y-ȳ) / √(Σ (x-x̄)² Σ (y-ȳ)²)``; 0 where either is constant
    (no linear relation can be read: a model that predicts one score for everything)."""
    xc, yc = x.double() - x.double().mean(), y.double() - y.double().mean()
    scale = float((xc.square().sum() * yc.square().sum()).sqrt())
    return float((xc * yc).sum()) / scale if scale > 0 else 0.0


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation: :func:`pearson` of the :func:`average_ranks` (ties averaged,
    as ``scipy.stats.spearmanr`` ranks them)."""
    return pearson(average_ranks(x), average_ranks(y))


@register_task
class Regression(HeadTask):
    """A score per example from ``--label-column`` (floats), a one-output head trained on each
    example's squared error; ``pearson`` is the headline, beside ``spearman``, ``mse`` and ``loss``."""

    name = "regression"
    problem_type = "regression"
    metric = "pearson"
    datasets = ()

    def label_tensor(self, ds: TextDataset) -> Tensor:
        return torch.tensor(ds.targets, dtype=torch.float32)

    def head_outputs(self, num_labels: int) -> int:
        return 1

    def loss_sums(self, logits: Tensor, labels: Tensor, positions: Tensor | None = None) -> Tensor:
        """``(N,)``: each example's squared error ``(ŷ - y)²`` (``ŷ``: its one output)."""
        return (logits.float()[:, 0] - labels.float()).square()

    def evaluate(self, fm, data: dict[str, Tensor], cfg) -> dict[str, float]:
        """``pearson`` (also ``accuracy``, the headline), ``spearman``, ``mse`` and ``loss`` (the
        mean squared error the clients train on: the same number) of slot 0's predictions."""
        preds = [logits[:, 0].cpu() for _, _, logits in eval_batches(fm, data, cfg)]
        y = data["labels"].double()
        pred = torch.cat(preds).double() if preds else torch.zeros(0, dtype=torch.float64)
        mse = float((pred - y).square().mean()) if len(y) else 0.0
        r = pearson(pred, y) if len(y) else 0.0
        return {"accuracy": r, "loss": mse, "pearson": r, "spearman": spearman(pred, y) if len(y) else 0.0,
                "mse": mse, "eval_examples": int(y.shape[0])}
