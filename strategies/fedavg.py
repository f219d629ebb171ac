"""FedAvg of LoRA factors (FedIT): ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k``.

The global update ``s B̄ Ā`` differs from ``Σ p_k s B_k A_k`` by the cross terms
``s Σ_{j≠k} p_j p_k B_j A_k`` (zero only when all A_k, or all B_k, are equal), which is
the aggregation error this strategy reports. Clients start the next round from
``(Ā, B̄)``. Every client must use the same rank.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import (
    Aggregate,
    ClientUpload,
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


def check_same_rank(uploads: Sequence[ClientUpload], name: str) -> None:
    """Raise when clients' ranks or scales differ (strategies that average factors)."""
    for layer in uploads[0].factors:
        ranks = {u.factors[layer][0].shape[0] for u in uploads}
        if len(ranks) > 1:
            raise ValueError(f"{name} needs one rank for every client, got ranks {sorted(ranks)}"
                             f" at {layer}; use --strategy flora for heterogeneous ranks")
    if len({u.scale for u in uploads}) > 1:
        raise ValueError(f"{name} needs one LoRA scale for every client")


def average_factors(uploads: Sequence[ClientUpload], weights: Sequence[float]):
    """Layer -> ``(Σ p_k A_k, Σ p_k B_k)``."""
    out = {}
    for layer in uploads[0].factors:
        A = sum(p * u.factors[layer][0] for p, u in zip(weights, uploads, strict=True))
        B = sum(p * u.factors[layer][1] for p, u in zip(weights, uploads, strict=True))
        out[layer] = (A, B)
    return out


@register_strategy
class FedAvg(Strategy):
    name = "fedavg"
    uploads = "A_k and B_k for every adapted layer, plus the task head"
    downloads = "the averaged A and B, plus the averaged head"
    sum_only = True
    heterogeneous_ranks = False

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        p = client_weights(uploads)
        check_same_rank(uploads, self.name)
        factors = average_factors(uploads, p)
        s = uploads[0].scale
        parts = {}
        for layer, (A, B) in factors.items():
            parts[layer] = ([s * B], [A], *ideal_factors(uploads, p, layer))
        new = GlobalState(factors=factors, scale=s, merged=dict(state.merged),
                          head=average_head(uploads, p))
        return Aggregate(state=new, fold={}, agg_error=relative_error(parts))
