"""RoLoRA (Chen et al., 2025, arXiv 2502.01755): alternate which factor trains.

Round t ≥ 1 trains one factor with the other frozen at the global one:

* odd t: ``A`` frozen at ``Ā``, ``B`` trains; ``B̄ = Σ p_k B_k``, and
  ``Σ p_k s B_k Ā = s B̄ Ā``;
* even t: ``B`` frozen at ``B̄``, ``A`` trains; ``Ā = Σ p_k A_k``, and
  ``Σ p_k s B̄ A_k = s B̄ Ā``.

Either way the average is exact (``agg_error`` is rounding only) and a client uploads one
factor: half of FedAvg's adapter bytes. Round 1 trains B because B starts at 0, where A's
gradient is zero. Weighted sums only: secure-aggregation and ``--dp client`` compatible.
Clients download both global factors each round (the frozen one changed the round before).
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
    average_factor,
    average_head,
    client_weights,
    ideal_factors,
    relative_error,
)
from .fedavg import check_same_rank
from .plan import AdapterPlan

TRAIN_B = AdapterPlan(train=("B",), upload=("B",))
TRAIN_A = AdapterPlan(train=("A",), upload=("A",))


@register_strategy
class RoLoRA(Strategy):
    name = "rolora"
    adapter_plan = TRAIN_B
    uploads = "odd rounds B_k, even rounds A_k, for every adapted layer, plus the task head"
    downloads = "the global A and B, plus the averaged head"
    sum_only = True
    heterogeneous_ranks = False

    def plan(self, rnd: int) -> AdapterPlan:
        return TRAIN_B if rnd % 2 == 1 else TRAIN_A

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        if state.factors is None:
            raise ValueError("rolora needs the global factors (the initial state) before aggregating")
        p = client_weights(uploads)
        check_same_rank(uploads, self.name)
        trained = self.plan(state.round + 1).train[0]
        s = uploads[0].scale
        factors, parts = {}, {}
        for layer, (A, B) in state.factors.items():
            mean = average_factor(uploads, p, layer, trained)
            A, B = (A, mean) if trained == "B" else (mean, B)
            factors[layer] = (A, B)
            parts[layer] = ([s * B], [A], *ideal_factors(uploads, p, layer))
        new = GlobalState(factors=factors, scale=s, merged=dict(state.merged),
                          head=average_head(uploads, p))
        return Aggregate(state=new, fold={}, agg_error=relative_error(parts))
