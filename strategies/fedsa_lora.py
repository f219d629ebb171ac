"""FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463): share A, keep B on each client.

A learns what is general and B what is client-specific, so only ``A`` travels and is
averaged, ``Ā = Σ p_k A_k``; each client's ``B_k`` stays on the client (personal state,
never uploaded) and trains on from where it was. Client k's model after round t is
``W0 + s B_k Ā``: a personal model, measured on the client's own held-out examples
(``--personal-test-fraction``; rows report ``personal_accuracy``).

The server never sees any ``B_k``, so it has no global update to compare with:
``agg_error`` is None, and its "global model" is ``Ā`` with the round-0 ``B`` (zero), i.e.
the base model plus the averaged head; that is what its ``accuracy`` measures and what is
exported. Weighted sums only (secure-aggregation and ``--dp client`` compatible); the
upload is A alone, about half of FedAvg's adapter bytes.
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
)
from .fedavg import check_same_rank
from .plan import AdapterPlan


@register_strategy
class FedSALoRA(Strategy):
    name = "fedsa-lora"
    adapter_plan = AdapterPlan(train=("A", "B"), upload=("A",), download=("A",), keep=("B",))
    uploads = "A_k for every adapted layer, plus the task head (B_k stays on the client)"
    downloads = "the averaged A and head (and the starting B once)"
    sum_only = True
    heterogeneous_ranks = False

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        if state.factors is None:
            raise ValueError("fedsa-lora needs the initial global factors before aggregating")
        p = client_weights(uploads)
        check_same_rank(uploads, self.name)
        factors = {}
        for layer, (_, B0) in state.factors.items():
            A = average_factor(uploads, p, layer, "A")
            factors[layer] = (A, B0)
        new = GlobalState(factors=factors, scale=uploads[0].scale, merged=dict(state.merged),
                          head=average_head(uploads, p))
        return Aggregate(state=new, fold={}, agg_error=None)
