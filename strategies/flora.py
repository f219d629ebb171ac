"""FLoRA: stacking, so the global update is exactly ``Σ p_k s_k B_k A_k``.

For one layer with client ranks r_k (which may differ):

    A_stack = [p_1 A_1; …; p_K A_K]          (Σ r_k × d_in)
    B_stack = [s_1 B_1, …, s_K B_K]          (d_out × Σ r_k)
    B_stack A_stack = Σ p_k s_k B_k A_k = ΔW*

The scale stays inside the blocks, so the stacked rank never enters a scale. As in
the paper, the server folds ``B_stack A_stack`` into the base weights every round
and clients start the next round from fresh adapters (A random, B = 0). What travels
down is the stacked pair: ``Σ r_k (d_in + d_out)`` numbers per layer, growing with K.
The aggregate is a concatenation, not a sum, so it is not secure-aggregation
compatible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import (
    Aggregate,
    ClientUpload,
    Factors,
    GlobalState,
    Strategy,
    register_strategy,
)
from .factors import (
    average_head,
    client_weights,
    ideal_factors,
    relative_error,
)
from .plan import AdapterPlan


def stack(uploads: Sequence[ClientUpload], weights: Sequence[float], layer: str) -> Factors:
    """``(A_stack, B_stack)`` for one layer."""
    A = torch.cat([p * u.factors[layer][0] for p, u in zip(weights, uploads, strict=True)], dim=0)
    B = torch.cat([u.scale * u.factors[layer][1] for u in uploads], dim=1)
    return A, B


def compact(A: torch.Tensor, B: torch.Tensor) -> Factors:
    """Exactly re-factor ``B A`` to rank ≤ min(d_out, d_in) once the stack outgrows it.

    With ``B = Q R`` (reduced QR, Q: d_out × d_out when rank > d_out), ``B A = Q (R A)``.
    Applied on whichever side is smaller; exact up to rounding.
    """
    d_out, rank = B.shape
    d_in = A.shape[1]
    if rank <= min(d_out, d_in):
        return A, B
    if d_out <= d_in:
        Q, R = torch.linalg.qr(B.double())                     # Q (d_out, d_out)
        return (R @ A.double()).to(A.dtype), Q.to(B.dtype)
    Q, R = torch.linalg.qr(A.double().T)                       # A = Rᵀ Qᵀ, Q (d_in, d_in)
    return Q.T.to(A.dtype), (B.double() @ R.T).to(B.dtype)


def merge(merged: dict[str, Factors], layer: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Add the fold ``B A`` to ``merged[layer]`` (all updates folded so far), compacted."""
    if layer in merged:
        mA, mB = merged[layer]
        A, B = compact(torch.cat([mA, A], dim=0), torch.cat([mB, B], dim=1))
    merged[layer] = (A, B)


@register_strategy
class FLoRA(Strategy):
    name = "flora"
    adapter_plan = AdapterPlan(download=(), start="fresh")
    uploads = "A_k and B_k for every adapted layer (any rank r_k), plus the task head"
    downloads = "the stacked A and B (Σ r_k rows/columns) to fold into the base, plus the head"
    sum_only = False
    heterogeneous_ranks = True
    folds = True

    @classmethod
    def fold_rank(cls, ranks: Sequence[int]) -> int:
        return sum(ranks)                                             # the stack of every B_k A_k

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        p = client_weights(uploads)
        fold, merged, parts = {}, dict(state.merged), {}
        for layer in uploads[0].factors:
            A, B = stack(uploads, p, layer)
            fold[layer] = (A, B)
            parts[layer] = ([B], [A], *ideal_factors(uploads, p, layer))
            merge(merged, layer, A, B)
        new = GlobalState(factors=None, scale=1.0, merged=merged, head=average_head(uploads, p))
        return Aggregate(state=new, fold=fold, agg_error=relative_error(parts))
