"""FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): A frozen and shared, only B trains.

Every client holds the same ``A_0`` for every round: the round-0 global A, drawn from
the job's seed (PEFT's kaiming-uniform init) and sent once. Only ``B`` (and the task
head) train, travel and are averaged:

    B̄ = Σ p_k B_k,      Σ p_k s B_k A_0 = s B̄ A_0

so the aggregate is exact (``agg_error`` is rounding only), it needs weighted sums alone
(secure aggregation, ``--dp client``) and DP-SGD computes per-example gradients of B only.
The upload is half of FedAvg's (plus the head). With A fixed, the update's size is set by
``α`` and the learning rate together; the paper raises the scale (α) instead of the rank.
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


@register_strategy
class FFALoRA(Strategy):
    name = "ffa-lora"
    adapter_plan = AdapterPlan(train=("B",), upload=("B",), download=("B",), shared=("A",))
    uploads = "B_k for every adapted layer, plus the task head"
    downloads = "the averaged B and head (and the frozen A once)"
    sum_only = True
    heterogeneous_ranks = False

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        if state.factors is None:
            raise ValueError("ffa-lora needs the global A (the initial state) before aggregating")
        p = client_weights(uploads)
        check_same_rank(uploads, self.name)
        s = uploads[0].scale
        factors, parts = {}, {}
        for layer, (A, _) in state.factors.items():
            B = average_factor(uploads, p, layer, "B")
            factors[layer] = (A, B)
            parts[layer] = ([s * B], [A], *ideal_factors(uploads, p, layer))
        new = GlobalState(factors=factors, scale=s, merged=dict(state.merged),
                          head=average_head(uploads, p))
        return Aggregate(state=new, fold={}, agg_error=relative_error(parts))
