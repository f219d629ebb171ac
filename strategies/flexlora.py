"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): heterogeneous ranks through an SVD.

Clients may train different ranks ``r_k``. The server forms the exact aggregate in factored
form, FLoRA's stack (scale inside the blocks):

    ΔW* = Σ p_k s_k B_k A_k = B_stack A_stack,   A_stack = [p_k A_k]  (Σ r_k × d_in),
                                                 B_stack = [s_k B_k]  (d_out × Σ r_k)

The global model is ``W0 + ΔW*`` (``agg_error`` is rounding only; it is what the server
evaluates and exports). Client k restarts the next round from the best rank-``r_k``
approximation ``U_k Σ_k V_kᵀ`` of ``ΔW*``, split as ``B = U_k Σ_k^{1/2} / √s_k``,
``A = Σ_k^{1/2} V_kᵀ / √s_k`` (so ``s_k B A = U_k Σ_k V_kᵀ``): from the factors (QR of
each stacked factor, then the SVD of the small ``Σr × Σr`` core; never a ``d × d`` SVD).
The stack travels down once for everybody (``Σ r_k (d_in + d_out)`` numbers per layer)
and each client truncates it to its own rank (:func:`~.base.truncated_factors`, the same
code as the server's). Rows report each
client's truncation error ``‖ΔW* − trunc_{r_k}(ΔW*)‖_F / ‖ΔW*‖_F`` (over all layers) in
``truncation_error_per_client``. Round 1 starts from fresh adapters (A random, B = 0; a
zero ΔW* has no directions to truncate to). Not a plain sum (no secure aggregation, no
``--dp client``).
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
    factored_svd,
    ideal_factors,
    relative_error,
)
from .flora import compact, stack
from .plan import AdapterPlan

FRESH = AdapterPlan(download=(), start="fresh")
"""Round 1: fresh adapters, drawn from the seed the server sends."""


@register_strategy
class FlexLoRA(Strategy):
    name = "flexlora"
    uploads = "A_k and B_k for every adapted layer (any rank r_k), plus the task head"
    downloads = "the stacked A and B of ΔW* (Σ r_k), which each client truncates to its rank, plus the head"
    sum_only = False
    heterogeneous_ranks = True

    def plan(self, rnd: int) -> AdapterPlan:
        return FRESH if rnd <= 1 else self.adapter_plan

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        p = client_weights(uploads)
        ranks = [next(iter(u.factors.values()))[0].shape[0] for u in uploads]
        factors, parts, tail = {}, {}, [0.0] * len(uploads)
        total = 0.0
        for layer in uploads[0].factors:
            A, B = compact(*stack(uploads, p, layer))
            factors[layer] = (A, B)
            parts[layer] = ([B], [A], *ideal_factors(uploads, p, layer))
            sq = factored_svd(A, B)[1] ** 2                      # σ_i² of ΔW*, descending
            total += float(sq.sum())
            for k, r in enumerate(ranks):
                tail[k] += float(sq[r:].sum())
        truncation = [(t / total) ** 0.5 if total > 0 else 0.0 for t in tail]
        new = GlobalState(factors=factors, scale=1.0, merged=dict(state.merged),
                          head=average_head(uploads, p))
        return Aggregate(state=new, fold={}, agg_error=relative_error(parts),
                         metrics={"truncation_error_per_client": truncation})
