"""The local optimizer of a job (``--optimizer``): AdamW, or SGD with momentum.

Both act coordinate by coordinate, so the clients of a batched pass (each its own slice of a
parameter with a client dimension) are optimized independently, exactly as if each trained
alone. Under DP-SGD they differ in how they treat noise: AdamW divides each coordinate's step by
its running RMS, so a coordinate whose gradient is mostly noise still moves by about ``lr`` every
step; SGD moves it in proportion to the noisy gradient, whose noise averages out over steps::

    SGD:    b ← μ b + g;        θ ← θ − lr · b                       (μ = SGD_MOMENTUM)
    AdamW:  θ ← θ − lr · m̂ / (√v̂ + ε) − lr · λ θ

A round's ``lr`` follows ``--lr-schedule`` (:func:`round_lr`); each round's optimizer is new, as a
client's local training starts afresh from the global state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "sgd")
SGD_MOMENTUM = 0.9
LR_SCHEDULES = ("constant", "cosine")


def round_lr(lr: float, rnd: int, rounds: int, schedule: str = "constant", lr_min: float = 0.0) -> float:
    """The local learning rate of round ``rnd`` of ``rounds``.

    ``constant``: ``lr``. ``cosine``: ``lr_min + (lr − lr_min)(1 + cos(π (rnd − 1) / rounds)) / 2``,
    ``lr`` in round 1 and falling toward ``lr_min`` (FlowerTune's annealing, shifted so that the
    first round trains at ``lr`` and the last above ``lr_min``). Round 0 (the server's steps on public
    data before round 1) trains at ``lr``.
    """
    if schedule == "constant" or rnd < 1:
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * (rnd - 1) / rounds)) / 2


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, at ``cfg.lr`` with ``cfg.weight_decay``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=SGD_MOMENTUM, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
