"""Fed-SB (shared A, B; averaged r × r cores) and its initialisation, against the dense
reference (``dense_reference``).
"""

from __future__ import annotations

import pytest
import torch

from fedlora.strategies import ClientUpload, GlobalState
from fedlora.strategies.fed_sb import FedSB, initialize_from_gradients
from tests.strategies.dense_reference import (
    F64,
    dense_ideal_sb,
    dense_rel_error,
    global_dense,
    sb_setup,
    weights,
)


def test_fed_sb_initialize_is_best_rank_r_of_sign_step():
    # Prepare: min(d) <= r + oversampling, so the randomized SVD covers the matrix.
    rank, scale, lr = 3, 2.0, 1e-3
    strat, grads, state, _ = sb_setup(rank=rank, scale=scale)
    p = weights(grads)

    for layer in ("q", "v"):
        # Slow reference: full SVD truncation of -lr * sign(Σ p_k G_k).
        G = sum(pk * u.grads[layer] for pk, u in zip(p, grads, strict=True))
        target = -lr * torch.sign(G)
        U, S, Vh = torch.linalg.svd(target)
        best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
        assert S[rank - 1] - S[rank] > 1e-6 * S[0]        # truncation is unique

        # Execute (already done in sb_setup) / Assert
        A, B = state.factors[layer]
        R0 = state.cores[layer]
        assert A.shape == (rank, G.shape[1]) and B.shape == (G.shape[0], rank)
        assert R0.shape == (rank, rank)
        torch.testing.assert_close(A @ A.T, torch.eye(rank, dtype=F64), rtol=0, atol=1e-10)
        torch.testing.assert_close(B.T @ B, torch.eye(rank, dtype=F64), rtol=0, atol=1e-10)
        init = scale * B @ R0 @ A
        rel = torch.linalg.norm(init - best) / torch.linalg.norm(best)
        assert rel <= 1e-4
        torch.testing.assert_close(torch.diag(R0) * scale, S[:rank], rtol=1e-8, atol=0)
    assert state.scale == scale


def test_fed_sb_initialize_is_deterministic_in_seed():
    # Prepare
    _, grads, state, _ = sb_setup(seed=1)

    # Execute
    again = initialize_from_gradients(FedSB(init_lr=1e-3, init="dense", seed=7), grads, rank=3, scale=2.0)

    # Assert
    for layer in state.factors:
        torch.testing.assert_close(again.factors[layer][0], state.factors[layer][0])
        torch.testing.assert_close(again.cores[layer], state.cores[layer])


def test_fed_sb_aggregate_averages_cores_exactly():
    # Prepare
    strat, _, state, clients = sb_setup(seed=2)
    p = weights(clients)

    # Execute
    result = strat.aggregate(clients, state)

    # Assert
    assert result.agg_error <= 1e-5
    for layer in ("q", "v"):
        R_bar = sum(pk * u.cores[layer] for pk, u in zip(p, clients, strict=True))
        torch.testing.assert_close(result.state.cores[layer], R_bar)
        torch.testing.assert_close(global_dense(result.state, layer),
                                   dense_ideal_sb(clients, state, layer), rtol=1e-10, atol=1e-12)
        assert result.state.factors[layer] is state.factors[layer]     # A, B stay frozen
    assert result.fold == {}


def test_fed_sb_aggregate_error_matches_dense_reference():
    # Prepare
    strat, _, state, clients = sb_setup(seed=3)

    # Execute
    result = strat.aggregate(clients, state)
    ideal = {k: dense_ideal_sb(clients, state, k) for k in ("q", "v")}
    agg = {k: global_dense(result.state, k) for k in ("q", "v")}

    # Assert
    assert dense_rel_error(agg, ideal) <= 1e-10
    assert result.agg_error == pytest.approx(dense_rel_error(agg, ideal), abs=1e-7)


def test_fed_sb_error_uses_the_shared_scale_not_the_lora_scale_field():
    """BUG demonstration: in LoRA-SB mode every client's update is ``s B R_k A`` with the
    shared ``s = state.scale``, and ``R̄ = Σ p_k R_k`` makes the aggregate exact. But
    ``FedSB.aggregate`` builds the ideal with ``ideal_factors(..., shared=(A, B))``,
    which multiplies by each upload's ``scale`` field, documented in ``ClientUpload``
    as "LoRA mode: s_k = α / r_k" and defaulting to 1.0. A Fed-SB client that uploads
    only its cores therefore gets a reported agg_error of |s − 1| (here 1.0) although
    the aggregate is exact."""
    # Prepare: identical to the exact case, except the uploads leave `scale` at default.
    strat, _, state, clients = sb_setup(seed=4, scale=2.0)
    bare = [ClientUpload(num_examples=u.num_examples, cores=u.cores) for u in clients]

    # Execute
    result = strat.aggregate(bare, state)

    # Assert: the aggregate itself is exact w.r.t. the shared-scale ideal ...
    for layer in ("q", "v"):
        torch.testing.assert_close(global_dense(result.state, layer),
                                   dense_ideal_sb(bare, state, layer), rtol=1e-10, atol=1e-12)
    # ... so the reported error must be ~0 (fails: it is 1.0, the scale ratio minus one).
    assert result.agg_error <= 1e-5, (
        f"Fed-SB agg_error={result.agg_error} uses ClientUpload.scale (default 1.0) instead "
        f"of the shared state.scale={state.scale}"
    )


def test_fed_sb_rejects_rank_above_layer_size_and_missing_init():
    # Prepare
    gen = torch.Generator().manual_seed(0)
    grads = [ClientUpload(num_examples=1, grads={"q": torch.randn(4, 6, generator=gen)})]
    cores = [ClientUpload(num_examples=1, cores={"q": torch.eye(2)})]

    # Execute / Assert
    with pytest.raises(ValueError, match="exceeds"):
        initialize_from_gradients(FedSB(init="dense"), grads, rank=5, scale=1.0)
    with pytest.raises(ValueError, match="initialisation"):
        FedSB().aggregate(cores, GlobalState())
    with pytest.raises(ValueError, match="init_lr"):
        FedSB(init_lr=0.0)
    for bad in (float("nan"), float("inf")):  # were taken, and made the initial state nan
        with pytest.raises(ValueError, match="init_lr"):
            FedSB(init_lr=bad)
