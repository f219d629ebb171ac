"""The local optimizer of a job (``--optimizer``): AdamW, or SGD with momentum.

Both act coordinate by coordinate, so the clients of a batched pass (each its own slice of a
parameter with a client dimension) are optimized independently, exactly as if each trained
alone. Under DP-SGD they differ in how they treat noise: AdamW divides each coordinate's step by
its running RMS, so a coordinate whose gradient is mostly noise still moves by about ``lr`` every
step; SGD moves it in proportion to the noisy gradient, whose noise averages out over steps::

    SGD:    b ← μ b + g;        θ ← θ − lr · b                       (μ = SGD_MOMENTUM)
    AdamW:  θ ← θ − lr · m̂ / (√v̂ + ε) − lr · λ θ
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "sgd")
SGD_MOMENTUM = 0.9


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, at ``cfg.lr`` with ``cfg.weight_decay``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=SGD_MOMENTUM, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
