"""FedEx-LoRA (Singhal et al., 2024, arXiv 2410.09432): FedAvg plus the exact residual.

The server averages ``Ā = Σ p_k A_k`` and ``B̄ = Σ p_k B_k`` (clients continue from them)
and folds the residual of that average into the frozen weights:

    R = Σ p_k s B_k A_k − s B̄ Ā                                   (d_out × d_in, rank ≤ (K+1) r)
      = [p_1 s B_1, …, p_K s B_K, −s B̄] · [A_1; …; A_K; Ā]        (as factors)

so ``W0 + R + s B̄ Ā = W0 + Σ p_k ΔW_k`` exactly: ``agg_error`` is rounding only. The
residual travels as those factors (FLoRA's fold machinery), never as a dense matrix:
``(K + 1) r (d_in + d_out)`` numbers per layer and round, growing with K. The fold needs
each client's product ``B_k A_k``, so the aggregate is not a plain sum (no secure
aggregation, no ``--dp client``). Every client uses one rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
from .fedavg import average_factors, check_same_rank
from .flora import merge


@register_strategy
class FedExLoRA(Strategy):
    name = "fedex-lora"
    uploads = "A_k and B_k for every adapted layer, plus the task head"
    downloads = "Ā and B̄, the residual's factors to fold into the base, plus the head"
    sum_only = False
    heterogeneous_ranks = False
    folds = True

    @classmethod
    def fold_rank(cls, ranks: Sequence[int]) -> int:
        return (len(ranks) + 1) * max(ranks)                          # every B_k A_k and B̄ Ā

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        p = client_weights(uploads)
        check_same_rank(uploads, self.name)
        s = uploads[0].scale
        fold, merged, parts = {}, dict(state.merged), {}
        factors = average_factors(uploads, p)
        for layer, (A_bar, B_bar) in factors.items():
            us, vs = ideal_factors(uploads, p, layer)                  # p_k s B_k, A_k
            fA = torch.cat([*vs, A_bar], dim=0)                       # ((K+1) r, d_in)
            fB = torch.cat([*us, -s * B_bar], dim=1)                  # (d_out, (K+1) r)
            fold[layer] = (fA, fB)
            parts[layer] = ([fB, s * B_bar], [fA, A_bar], us, vs)
            merge(merged, layer, fA, fB)
        new = GlobalState(factors=factors, scale=s, merged=merged, head=average_head(uploads, p))
        return Aggregate(state=new, fold=fold, agg_error=relative_error(parts))
