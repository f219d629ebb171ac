"""A server learning rate around a strategy (``--server-lr``): FedOpt's server SGD step.

A round's aggregate is read as a pseudo-gradient step from the global state the clients started
from. With server learning rate ``η``, every tensor ``x`` of the global state (the factors ``A``/``B``,
Fed-SB's cores ``R``, the task head) moves

    x_t = x_{t-1} + η (x̄_t − x_{t-1})                                   (Reddi et al., 2021)

where ``x̄_t`` is the wrapped strategy's aggregate; a factor the clients do not train (FFA-LoRA's
shared A, FedSA-LoRA's personal B in the global state) has ``x̄_t = x_{t-1}`` and stays. ``η = 1``
is the strategy itself; ``η > 1`` extrapolates along the clients' mean update. Ten clients that
each take 5 local steps move the global model about as far as one client's 5 steps, while a
centralized run on the same examples takes 50: the server step scales the averaged
(lower-variance) update instead of the clients' own steps. Measured, it is no free gain: on
SmolLM2's SST-2 SFT (FedAvg, 4 rounds of 5 steps) η = 2 was no better IID and 10 points worse under
label skew, and η = 4 diverged (``benchmarks/RESULTS.md``, 2026-12-04).

A strategy that folds its aggregate into the base (FLoRA, FedEx-LoRA) takes the same step in
weight space, exactly: with ``W`` the model's weights (base, folds so far, live adapter), the
round's fold is replaced by the one that puts the model at ``W_{t-1} + η (W̄_t − W_{t-1})``:

    fold' = η fold + (η − 1) (s B̄ Ā − s B_{t-1} A_{t-1})               (rank + 2r for FedEx-LoRA)

while the clients start from the strategy's own factors (FLoRA: fresh ones, so the second term is
absent and ``fold' = η fold``). FlexLoRA, whose clients restart from truncations of a restacked
global update, has neither averaged factors nor a fold to scale, and is refused. The step keeps no
state of its own (no server momentum), so a checkpoint, a resumed job and every engine give the
same result. ``agg_error`` stays the wrapped strategy's: how exactly it averaged the clients,
before the server's step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from .base import Aggregate, ClientUpload, Factors, GlobalState, Strategy
from .flora import merge
from .wrap import Wrapped


def step(old: Tensor | None, new: Tensor, lr: float) -> Tensor:
    """``old + lr (new − old)``; ``new`` where there is no old value."""
    return new if old is None else old + lr * (new - old)


class ServerStep(Wrapped):
    """``inner``'s aggregate, taken ``lr`` times as far from the last global state.

    Parameters
    ----------
    inner : Strategy
        The wrapped strategy (possibly itself a wrapper: client-level DP, robust aggregation).
    lr : float
        ``η > 0``; 1 is ``inner`` unchanged.

    Raises
    ------
    ValueError
        For ``lr ≤ 0``, or a strategy whose clients start from fresh factors and that does not fold
        (FlexLoRA).
    """

    def __init__(self, inner: Strategy, lr: float) -> None:
        super().__init__(inner)
        if not 0 < lr < math.inf:
            raise ValueError(f"--server-lr must be finite and > 0 (1: off), got {lr}")
        if inner.fresh_adapters and not inner.folds:
            raise ValueError(f"{inner.name} restarts its clients from truncations of a restacked global"
                             " update, so it has neither averaged factors nor a fold for --server-lr to"
                             " scale; use --server-lr 1")
        self.lr = lr

    def moved(self, agg: Aggregate, old: GlobalState) -> Aggregate:
        """``agg`` with its state moved ``lr`` times as far from ``old``: its factors and cores, or
        (a folding strategy) its fold, and its head. A frozen, shared or personal factor the strategy
        did not change stays where it is."""
        new, fold = agg.state, agg.fold
        factors, cores, merged = new.factors, new.cores, new.merged
        if self.folds:
            fold, merged = self.moved_fold(agg, old)
        elif factors is not None and old.factors is not None:
            factors = {}
            for layer, (A, B) in new.factors.items():
                A0, B0 = old.factors.get(layer, (None, None))
                factors[layer] = (step(A0, A, self.lr), step(B0, B, self.lr))
        if cores is not None and old.cores is not None:
            cores = {layer: step(old.cores.get(layer), R, self.lr) for layer, R in cores.items()}
        head = {key: step(old.head.get(key), t, self.lr) for key, t in new.head.items()}
        state = replace(new, factors=factors, cores=cores, merged=merged, head=head)
        return replace(agg, state=state, fold=fold, metrics={**agg.metrics, "server_lr": self.lr})

    def moved_fold(self, agg: Aggregate, old: GlobalState) -> tuple[dict[str, Factors], dict[str, Factors]]:
        """``(fold', merged')``: the fold that takes the model ``lr`` times as far (module docstring),
        and every fold so far with it."""
        new, lr = agg.state, self.lr
        fold, merged = {}, dict(old.merged)
        for layer, (fA, fB) in agg.fold.items():               # fA (k, d_in), fB (d_out, k)
            As, Bs = [fA], [lr * fB]
            if new.factors is not None and old.factors is not None:   # the live adapter moved too
                (A, B), (A0, B0) = new.factors[layer], old.factors[layer]
                As += [A, A0]
                Bs += [(lr - 1) * new.scale * B, (1 - lr) * old.scale * B0]
            fold[layer] = (torch.cat(As, dim=0), torch.cat(Bs, dim=1))   # (k + 2r, d_in), (d_out, k + 2r)
            merge(merged, layer, *fold[layer])
        return fold, merged

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        """The wrapped aggregate, then the server's step."""
        return self.moved(self.inner.aggregate(uploads, state), state)

    def aggregate_mean(self, mean: ClientUpload, clients: int, state: GlobalState) -> Aggregate:
        """The wrapped aggregate of the clients' mean (secure aggregation), then the server's step."""
        return self.moved(self.inner.aggregate_mean(mean, clients, state), state)

    def describe(self) -> dict[str, object]:
        return {**self.inner.describe(), "server_lr": self.lr}
