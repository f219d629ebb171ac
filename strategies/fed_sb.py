"""Fed-SB: LoRA-SB adapters, ``ΔW_k = s · B R_k A`` with A, B frozen and shared.

**Initialisation** (LoRA-SB, arXiv 2411.19557, computed federatedly). Each client
sends a gradient estimate ``G_k`` of its loss with respect to each adapted frozen
weight (``d_out × d_in``, summed over a few local batches); the server forms
``Ḡ = Σ p_k G_k`` (a weighted sum: no pooled data, secure-aggregation compatible).
As in the LoRA-SB paper, the first full fine-tuning step is approximated by the
first Adam step, which is sign descent: ``ΔŴ = −η · sign(Ḡ)``. Its best rank-r
approximation ``U_r Σ_r V_rᵀ`` is taken with a randomized low-rank SVD
(``torch.svd_lowrank``; never a full SVD of the ``d × d`` matrix), and

    B = U_r            (d_out × r, orthonormal columns, frozen)
    A = V_rᵀ           (r × d_in, orthonormal rows, frozen)
    R_0 = Σ_r / s      (r × r, trained)

so that training starts from ``W0 + s B R_0 A ≈ W0 + ΔŴ``, the approximated first step.

**Rounds** average R only: ``R̄ = Σ p_k R_k``. Because B and A are common,
``s B R̄ A = Σ p_k s B R_k A`` exactly: the aggregation error is zero up to rounding.
Each client uploads and downloads ``r²`` numbers per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import (
    Aggregate,
    ClientUpload,
    Factors,
    GlobalState,
    Option,
    Strategy,
    average_head,
    client_weights,
    ideal_factors,
    register_strategy,
    relative_error,
)
from .plan import AdapterPlan


def low_rank_factors(delta: Tensor, rank: int, seed: int = 0, niter: int = 4,
                     oversample: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` ``(U, S, V)`` of ``delta`` by randomized SVD (deterministic in ``seed``)."""
    q = min(rank + oversample, min(delta.shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(delta.double(), q=q, niter=niter)
    return U[:, :rank].to(delta.dtype), S[:rank].to(delta.dtype), V[:, :rank].to(delta.dtype)


def init_from_gradient(G: Tensor, rank: int, scale: float, lr: float,
                       seed: int = 0) -> tuple[Factors, Tensor]:
    """``((A, B), R_0)`` for one layer from the aggregated gradient ``G``."""
    if rank > min(G.shape):
        raise ValueError(f"Fed-SB rank {rank} exceeds the layer's size {tuple(G.shape)}")
    U, S, V = low_rank_factors(-lr * torch.sign(G), rank, seed=seed)
    return (V.T.contiguous(), U.contiguous()), torch.diag(S) / scale


@register_strategy
class FedSB(Strategy):
    name = "fed-sb"
    adapter_plan = AdapterPlan(factors=("A", "B", "R"), train=("R",), upload=("R",), download=("R",),
                               shared=("A", "B"))
    uploads = ("init round: a gradient estimate G_k per layer (d_out × d_in);"
               " then R_k (r × r) per layer, plus the head")
    downloads = "init round: the shared frozen A, B and R_0; then the averaged R, plus the head"
    sum_only = True
    heterogeneous_ranks = False
    needs_gradient_init = True
    default_lr = 1e-2  # only the r×r cores train: a larger step than LoRA's A and B
    options = {"init_lr": Option(float, 1e-3, "η of the approximated first step −η·sign(G)")}
    takes_seed = True

    def __init__(self, init_lr: float = 1e-3, seed: int = 0) -> None:
        if init_lr <= 0:
            raise ValueError(f"Fed-SB init_lr must be > 0, got {init_lr}")
        self.init_lr = init_lr
        self.seed = seed

    def initialize(self, uploads: Sequence[ClientUpload], rank: int, scale: float) -> GlobalState:
        p = client_weights(uploads)
        factors, cores = {}, {}
        for i, layer in enumerate(uploads[0].grads):
            G = sum(w * u.grads[layer] for w, u in zip(p, uploads, strict=True))
            factors[layer], cores[layer] = init_from_gradient(G, rank, scale, self.init_lr,
                                                              seed=self.seed + i)
        return GlobalState(factors=factors, scale=scale, cores=cores)

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        if state.factors is None or state.cores is None:
            raise ValueError("fed-sb needs its initialisation round before aggregating R")
        p = client_weights(uploads)
        cores, parts = {}, {}
        for layer in uploads[0].cores:
            R = sum(w * u.cores[layer] for w, u in zip(p, uploads, strict=True))
            cores[layer] = R
            A, B = state.factors[layer]
            parts[layer] = ([state.scale * B @ R], [A],
                            *ideal_factors(uploads, p, layer, shared=(A, B), shared_scale=state.scale))
        new = GlobalState(factors=state.factors, scale=state.scale, cores=cores,
                          merged=dict(state.merged), head=average_head(uploads, p))
        return Aggregate(state=new, fold={}, agg_error=relative_error(parts))
