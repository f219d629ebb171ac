"""LoRA-FAIR: FedAvg plus a server-side residual correction of B.

The server keeps ``Ā = Σ p_k A_k`` and ``B̄ = Σ p_k B_k`` and looks for a correction
``ΔB`` so that ``s (B̄ + ΔB) Ā`` approaches the ideal ``ΔW* = Σ p_k s_k B_k A_k``;
clients start the next round from ``(Ā, B̄ + ΔB)`` (the paper's "Avg-Initial"
initialisation), so nothing extra travels.

Objective implemented (LoRA-FAIR, arXiv 2411.14961, with the paper's regulariser
weight λ = 0.01):

    min_ΔB  ‖ΔW* − s (B̄ + ΔB) Ā‖_F²  +  λ ‖ΔB‖_F²

The paper states its similarity term generally and solves it iteratively; we take
the squared Frobenius residual as the similarity term, which makes the problem a
ridge regression with the exact closed form

    ΔB = s (ΔW* − s B̄ Ā) Āᵀ (s² Ā Āᵀ + λ I_r)⁻¹,

where ``ΔW* Āᵀ = Σ p_k s_k B_k (A_k Āᵀ)`` needs only ``r × r`` and ``d × r``
products: no ``d × d`` matrix is formed. Since ``ΔB = 0`` is feasible, the residual
is never above FedAvg's. Weights are ``p_k = n_k / Σ n`` (the official code averages
uniformly). Needs one rank for every client; the aggregate uses only weighted sums
of client uploads (``Σ p_k A_k``, ``Σ p_k B_k``) plus ``Σ p_k B_k (A_k Āᵀ)``, which
needs Ā first, so it is not a single secure-aggregation sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import (
    Aggregate,
    ClientUpload,
    GlobalState,
    Option,
    Strategy,
    register_strategy,
)
from .factors import (
    average_head,
    client_weights,
    ideal_factors,
    relative_error,
)
from .fedavg import average_factors, check_same_rank


def correction(uploads: Sequence[ClientUpload], weights: Sequence[float], layer: str,
               A_bar: Tensor, B_bar: Tensor, s: float, lam: float) -> Tensor:
    """The closed-form ``ΔB`` (``d_out × r``) for one layer, computed in float64."""
    Ab, Bb = A_bar.double(), B_bar.double()
    target = sum(p * u.scale * u.factors[layer][1].double() @ (u.factors[layer][0].double() @ Ab.T)
                 for p, u in zip(weights, uploads, strict=True))       # ΔW* Āᵀ   (d_out, r)
    gram = Ab @ Ab.T                                                   # Ā Āᵀ     (r, r)
    residual = target - s * Bb @ gram                                  # (ΔW* − s B̄ Ā) Āᵀ
    system = s * s * gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    # ΔB system = s·residual  ->  systemᵀ ΔBᵀ = s·residualᵀ (system is symmetric). λ = 0 with Ā of
    # dependent rows (r > d_in) leaves system singular: the least-norm ΔB (λ → 0⁺), not a solve's.
    if lam == 0:
        return (torch.linalg.pinv(system, hermitian=True) @ (s * residual.T)).T.to(B_bar.dtype)
    return torch.linalg.solve(system, s * residual.T).T.to(B_bar.dtype)


@register_strategy
class LoRAFAIR(Strategy):
    name = "lora-fair"
    uploads = "A_k and B_k for every adapted layer, plus the task head"
    downloads = "Ā and the corrected B̄ + ΔB, plus the averaged head"
    sum_only = False
    heterogeneous_ranks = False
    options = {"lam": Option(float, 0.01, "λ of the ridge term λ‖ΔB‖²")}

    def __init__(self, lam: float = 0.01) -> None:
        if not 0 <= lam < math.inf:  # nan and inf would make every factor of the aggregate nan
            raise ValueError(f"LoRA-FAIR λ must be finite and ≥ 0, got {lam}")
        self.lam = lam

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        p = client_weights(uploads)
        check_same_rank(uploads, self.name)
        s = uploads[0].scale
        factors, parts = {}, {}
        for layer, (A, B) in average_factors(uploads, p).items():
            B = B + correction(uploads, p, layer, A, B, s, self.lam)
            factors[layer] = (A, B)
            parts[layer] = ([s * B], [A], *ideal_factors(uploads, p, layer))
        new = GlobalState(factors=factors, scale=s, merged=dict(state.merged),
                          head=average_head(uploads, p))
        return Aggregate(state=new, fold={}, agg_error=relative_error(parts))
