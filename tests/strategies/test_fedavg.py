"""FedAvg of the factors (inexact: mean of B times mean of A), against the dense reference
(``dense_reference``).
"""

from __future__ import annotations

import pytest
import torch

from fedlora.strategies import GlobalState
from fedlora.strategies.fedavg import FedAvg
from tests.strategies.dense_reference import (
    D_IN,
    D_OUT,
    F64,
    LAYERS,
    dense,
    dense_ideal,
    dense_rel_error,
    global_dense,
    same_rank_clients,
    weights,
)


def test_fedavg_error_positive_and_equals_dense_reference():
    # Prepare: same rank, different A_k and B_k, two layers.
    uploads = same_rank_clients(layers=LAYERS)
    p = weights(uploads)

    # Execute
    result = FedAvg().aggregate(uploads, GlobalState())

    # Assert
    s = uploads[0].scale
    agg, ideal = {}, {}
    for layer in LAYERS:
        A_bar = sum(pk * u.factors[layer][0] for pk, u in zip(p, uploads, strict=True))
        B_bar = sum(pk * u.factors[layer][1] for pk, u in zip(p, uploads, strict=True))
        torch.testing.assert_close(result.state.factors[layer][0], A_bar)
        torch.testing.assert_close(result.state.factors[layer][1], B_bar)
        agg[layer] = dense(A_bar, B_bar, s)
        ideal[layer] = dense_ideal(uploads, layer)
    expected = dense_rel_error(agg, ideal)
    assert expected > 0.1
    assert result.agg_error == pytest.approx(expected, rel=1e-9)
    assert result.state.scale == s
    assert result.fold == {}


@pytest.mark.parametrize("shared", ["A", "B"])
def test_fedavg_error_zero_when_one_factor_is_shared(shared):
    # Prepare: all A_k (or all B_k) equal, the other factor differs.
    uploads = same_rank_clients(seed=4)
    index = 0 if shared == "A" else 1
    common = uploads[0].factors["q"][index]
    for u in uploads:
        pair = list(u.factors["q"])
        pair[index] = common.clone()
        u.factors["q"] = tuple(pair)

    # Execute
    result = FedAvg().aggregate(uploads, GlobalState())

    # Assert
    assert result.agg_error <= 1e-7
    torch.testing.assert_close(global_dense(result.state, "q"), dense_ideal(uploads, "q"),
                               rtol=1e-10, atol=1e-10)


def test_fedavg_keeps_previous_merged_state():
    # Prepare
    merged = {"q": (torch.ones(1, D_IN, dtype=F64), torch.ones(D_OUT, 1, dtype=F64))}

    # Execute
    result = FedAvg().aggregate(same_rank_clients(), GlobalState(merged=merged))

    # Assert
    assert result.state.merged == merged
