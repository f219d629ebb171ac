"""LoRA-FAIR (FedAvg plus a ridge correction of B), against the dense reference
(``dense_reference``) and a least-squares reference of its correction.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.strategies import GlobalState, get_strategy
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.lora_fair import LoRAFAIR
from tests.strategies.dense_reference import (
    F64,
    LAYERS,
    dense_ideal,
    dense_rel_error,
    global_dense,
    ridge_reference,
    same_rank_clients,
    weights,
)


def test_lora_fair_error_strictly_below_fedavg():
    # Prepare
    uploads = same_rank_clients(seed=5, layers=LAYERS)

    # Execute
    fair = LoRAFAIR().aggregate(uploads, GlobalState())
    avg = FedAvg().aggregate(uploads, GlobalState())

    # Assert
    assert 0 < fair.agg_error < avg.agg_error
    agg = {k: global_dense(fair.state, k) for k in LAYERS}
    ideal = {k: dense_ideal(uploads, k) for k in LAYERS}
    assert fair.agg_error == pytest.approx(dense_rel_error(agg, ideal), rel=1e-8)


@pytest.mark.parametrize("lam", [0.01, 0.5])
def test_lora_fair_correction_solves_the_dense_ridge_problem(lam):
    # Prepare
    uploads = same_rank_clients(seed=6)
    p = weights(uploads)
    B_bar = sum(pk * u.factors["q"][1] for pk, u in zip(p, uploads, strict=True))
    expected = ridge_reference(uploads, "q", lam)

    # Execute
    result = get_strategy("lora-fair", lam=lam).aggregate(uploads, GlobalState())

    # Assert
    A_new, B_new = result.state.factors["q"]
    A_bar = sum(pk * u.factors["q"][0] for pk, u in zip(p, uploads, strict=True))
    torch.testing.assert_close(A_new, A_bar)
    torch.testing.assert_close(B_new - B_bar, expected, rtol=1e-8, atol=1e-10)
    # And it satisfies the normal equations written with the explicit dense ΔW*.
    s = uploads[0].scale
    dB = B_new - B_bar
    lhs = dB @ (s * s * A_bar @ A_bar.T + lam * torch.eye(A_bar.shape[0], dtype=F64))
    rhs = s * (dense_ideal(uploads, "q") - s * B_bar @ A_bar) @ A_bar.T
    torch.testing.assert_close(lhs, rhs, rtol=1e-8, atol=1e-10)


def test_lora_fair_lam_zero_is_least_squares_projection():
    # Prepare: Ā is 4 × 16, full row rank.
    uploads = same_rank_clients(seed=7)
    p = weights(uploads)
    A_bar = sum(pk * u.factors["q"][0] for pk, u in zip(p, uploads, strict=True))
    assert torch.linalg.matrix_rank(A_bar) == A_bar.shape[0]
    ideal = dense_ideal(uploads, "q")
    projection = ideal @ torch.linalg.pinv(A_bar) @ A_bar        # ΔW* onto Ā's row space

    # Execute
    result = LoRAFAIR(lam=0.0).aggregate(uploads, GlobalState())

    # Assert
    torch.testing.assert_close(global_dense(result.state, "q"), projection, rtol=1e-9, atol=1e-9)
    expected_error = float(torch.linalg.norm(ideal - projection) / torch.linalg.norm(ideal))
    assert result.agg_error == pytest.approx(expected_error, rel=1e-8)


def test_lora_fair_lam_zero_with_rank_above_d_in_takes_the_minimum_norm_correction():
    # Prepare: rank 20 over d_in 16, so Ā Āᵀ (20 × 20) is singular and Ā's rows span every input
    uploads = same_rank_clients(seed=3, rank=20)
    p, s = weights(uploads), uploads[0].scale
    A_bar = sum(pk * u.factors["q"][0] for pk, u in zip(p, uploads, strict=True))
    B_bar = sum(pk * u.factors["q"][1] for pk, u in zip(p, uploads, strict=True))
    ideal = dense_ideal(uploads, "q")
    # the λ → 0⁺ limit: the least-squares ΔB of least norm
    expected = (ideal - s * B_bar @ A_bar) @ torch.linalg.pinv(s * A_bar)

    # Execute
    result = LoRAFAIR(lam=0.0).aggregate(uploads, GlobalState())

    # Assert: the exact ΔW* and that ΔB (a solve of the singular system gave another ΔB, 10×
    # larger and set by rounding, and an aggregate error of 1e-5 in float32)
    torch.testing.assert_close(result.state.factors["q"][1] - B_bar, expected, rtol=1e-7, atol=1e-9)
    assert result.agg_error < 1e-12


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf")])
def test_lora_fair_rejects_negative_or_non_finite_lambda(lam):
    # Execute / Assert: nan and inf were taken, and made every factor of the aggregate nan
    with pytest.raises(ValueError, match="λ"):
        LoRAFAIR(lam=lam)
