"""FLoRA (stacked factors, exact) and its compaction, against the dense reference
(``dense_reference``).
"""

from __future__ import annotations

import pytest
import torch

from fedlora.strategies import GlobalState
from fedlora.strategies.flora import FLoRA, compact
from tests.strategies.dense_reference import (
    D_IN,
    D_OUT,
    F64,
    LAYERS,
    dense,
    dense_ideal,
    hetero_clients,
    weights,
)


def test_flora_exact_on_heterogeneous_ranks():
    # Prepare: ranks 2, 4, 8 with different α/r, unequal n_k, two layers.
    uploads = hetero_clients(layers=LAYERS)
    ideal = {k: dense_ideal(uploads, k) for k in LAYERS}

    # Execute
    result = FLoRA().aggregate(uploads, GlobalState())

    # Assert
    assert result.agg_error <= 1e-5
    for layer, (d_out, d_in) in LAYERS.items():
        A, B = result.fold[layer]
        assert A.shape == (2 + 4 + 8, d_in)
        assert B.shape == (d_out, 2 + 4 + 8)
        torch.testing.assert_close(dense(A, B), ideal[layer], rtol=1e-10, atol=1e-10)
        mA, mB = result.state.merged[layer]
        torch.testing.assert_close(dense(mA, mB), ideal[layer], rtol=1e-10, atol=1e-10)
    assert result.state.factors is None      # clients start from fresh adapters


def test_flora_float32_error_within_bound():
    # Prepare
    uploads = hetero_clients(seed=3, dtype=torch.float32)

    # Execute
    result = FLoRA().aggregate(uploads, GlobalState())

    # Assert
    assert result.agg_error <= 1e-5


def test_flora_blocks_carry_weight_and_scale():
    # Prepare: clients with different α/r, so the scales differ per block.
    uploads = hetero_clients(seed=1)
    p = weights(uploads)

    # Execute
    A, B = FLoRA().aggregate(uploads, GlobalState()).fold["q"]

    # Assert: A block k = p_k A_k, B block k = s_k B_k.
    start = 0
    for pk, u in zip(p, uploads, strict=True):
        Ak, Bk = u.factors["q"]
        r = Ak.shape[0]
        torch.testing.assert_close(A[start:start + r], pk * Ak)
        torch.testing.assert_close(B[:, start:start + r], u.scale * Bk)
        start += r
    assert len({u.scale for u in uploads}) == 3


def test_flora_merged_accumulates_over_two_rounds_with_exact_compaction():
    # Prepare: stacked rank 14 > min(d_out, d_in) = 12 each round.
    round1, round2 = hetero_clients(seed=10), hetero_clients(seed=11)
    strat = FLoRA()
    expected = dense_ideal(round1, "q") + dense_ideal(round2, "q")

    # Execute
    first = strat.aggregate(round1, GlobalState())
    second = strat.aggregate(round2, first.state)

    # Assert
    mA, mB = second.state.merged["q"]
    assert mA.shape[0] == mB.shape[1] == min(D_OUT, D_IN)      # compacted from 28
    torch.testing.assert_close(dense(mA, mB), expected, rtol=1e-9, atol=1e-9)
    fA, fB = second.fold["q"]                                   # only this round travels
    torch.testing.assert_close(dense(fA, fB), dense_ideal(round2, "q"), rtol=1e-10, atol=1e-10)
    assert second.agg_error <= 1e-5
    # The delta the state reports is the whole merged update.
    us, vs = second.state.delta("q")
    torch.testing.assert_close(sum(dense(v, u) for u, v in zip(us, vs, strict=True)), expected,
                               rtol=1e-9, atol=1e-9)


def test_flora_keeps_merged_layers_absent_from_the_round():
    # Prepare
    old = (torch.ones(1, 3, dtype=F64), torch.ones(2, 1, dtype=F64))
    state = GlobalState(merged={"old": old})

    # Execute
    result = FLoRA().aggregate(hetero_clients(seed=2), state)

    # Assert
    assert result.state.merged["old"] is old
    assert set(result.state.merged) == {"old", "q"}
    assert "old" not in result.fold


@pytest.mark.parametrize(("d_out", "d_in", "rank"), [(5, 9, 7), (9, 5, 7), (6, 6, 11)])
def test_compact_is_exact_when_rank_exceeds_min_dim(d_out, d_in, rank):
    # Prepare
    gen = torch.Generator().manual_seed(d_out * 100 + d_in)
    A = torch.randn(rank, d_in, generator=gen, dtype=F64)
    B = torch.randn(d_out, rank, generator=gen, dtype=F64)

    # Execute
    cA, cB = compact(A, B)

    # Assert
    assert cA.shape == (min(d_out, d_in), d_in)
    assert cB.shape == (d_out, min(d_out, d_in))
    torch.testing.assert_close(dense(cA, cB), dense(A, B), rtol=1e-10, atol=1e-10)


def test_compact_leaves_small_rank_untouched():
    # Prepare
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(3, 8, generator=gen)
    B = torch.randn(6, 3, generator=gen)

    # Execute
    cA, cB = compact(A, B)

    # Assert
    assert cA is A and cB is B
