"""Tiny aggregation cases whose expected numbers are worked out by hand.

Shared setting of most tests: two clients, 1 × 1 adapters, ``n = (1, 3)`` so
``p = (1/4, 3/4)`` (uniform averaging would give ``(1/2, 1/2)``):

    client 1: A_1 = 1, B_1 = 2, s_1 = 1  ->  ΔW_1 = 2
    client 2: A_2 = 3, B_2 = 4, s_2 = 1  ->  ΔW_2 = 12
    ΔW* = 1/4 · 2 + 3/4 · 12 = 0.5 + 9 = 9.5
    Ā = 1/4 · 1 + 3/4 · 3 = 2.5,  B̄ = 1/4 · 2 + 3/4 · 4 = 3.5,  s B̄ Ā = 8.75
"""

from __future__ import annotations

import pytest
import torch

from fedlora.strategies import ClientUpload, GlobalState, factored_sq_norm, get_strategy
from fedlora.strategies.factors import client_weights
from fedlora.strategies.fed_sb import initialize_from_gradients

F64 = torch.float64


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def two_clients(scale2: float = 1.0) -> list[ClientUpload]:
    return [
        ClientUpload(num_examples=1, factors={"w": (t([[1.0]]), t([[2.0]]))}, scale=1.0),
        ClientUpload(num_examples=3, factors={"w": (t([[3.0]]), t([[4.0]]))}, scale=scale2),
    ]


def test_client_weights_by_hand():
    # Execute / Assert
    assert client_weights(two_clients()) == [0.25, 0.75]


def test_fedavg_by_hand():
    # Prepare
    uploads = two_clients()

    # Execute
    result = get_strategy("fedavg").aggregate(uploads, GlobalState())

    # Assert: Ā = 2.5, B̄ = 3.5 (uniform would be 2 and 3); error |8.75 − 9.5| / 9.5 = 3/38.
    A, B = result.state.factors["w"]
    torch.testing.assert_close(A, t([[2.5]]))
    torch.testing.assert_close(B, t([[3.5]]))
    assert result.agg_error == pytest.approx(3 / 38, rel=1e-12)


def test_flora_by_hand_with_different_scales():
    # Prepare: s_2 = 2, so ΔW* = 1/4 · 2 + 3/4 · 2 · 12 = 18.5.
    uploads = two_clients(scale2=2.0)

    # Execute
    result = get_strategy("flora").aggregate(uploads, GlobalState())

    # Assert: A_stack = [p_1 A_1; p_2 A_2], B_stack = [s_1 B_1, s_2 B_2].
    A, B = result.fold["w"]
    torch.testing.assert_close(A, t([[0.25], [2.25]]))
    torch.testing.assert_close(B, t([[2.0, 8.0]]))
    torch.testing.assert_close(B @ A, t([[18.5]]))
    assert result.agg_error == pytest.approx(0.0, abs=1e-12)


def test_lora_fair_by_hand():
    # Prepare
    uploads = two_clients()

    # Execute
    exact = get_strategy("lora-fair", lam=0.0).aggregate(uploads, GlobalState())
    ridge = get_strategy("lora-fair", lam=0.01).aggregate(uploads, GlobalState())

    # Assert. λ = 0: ΔB = (9.5 − 8.75) · 2.5 / 2.5² = 0.3, so B = 3.8 and 3.8 · 2.5 = 9.5.
    torch.testing.assert_close(exact.state.factors["w"][1], t([[3.8]]))
    # The factored error subtracts squared norms, so rounding leaves ~sqrt(eps) ≈ 1e-8.
    assert exact.agg_error == pytest.approx(0.0, abs=1e-7)
    # λ = 0.01: ΔB = 0.75 · 2.5 / (6.25 + 0.01) = 1.875 / 6.26;
    # residual 0.75 − 2.5 · 1.875 / 6.26 = (4.695 − 4.6875) / 6.26, over 9.5.
    torch.testing.assert_close(ridge.state.factors["w"][1], t([[3.5 + 1.875 / 6.26]]))
    assert ridge.agg_error == pytest.approx(0.0075 / (6.26 * 9.5), rel=1e-9)


def test_fed_sb_sketched_initialisation_by_hand():
    # Prepare: G_1 = (1,2)ᵀ(1,2), G_2 = 3 G_1 with n = 3, 1: Ḡ = 3/4 G_1 + 3/4 G_1 = 1.5 (1,2)ᵀ(1,2),
    # rank 1, σ = 7.5, u = v = (1,2)/√5. A sketch of any width ≥ 1 holds u exactly, so
    # Z̄ = Qᵀ Ḡ has norm ‖Ḡ‖ = 7.5; c = η √(2·2) / 7.5 = 0.5·2/7.5 = 2/15 and the step is
    # −c Ḡ = −0.2 (1,2)ᵀ(1,2), of Frobenius norm η √(d_out d_in) = 1, like η·sign.
    g1 = t([[1.0, 2.0], [2.0, 4.0]])
    grads = [ClientUpload(num_examples=3, grads={"w": g1}), ClientUpload(num_examples=1, grads={"w": 3 * g1})]
    strat = get_strategy("fed-sb", init_lr=0.5, init="sketch", sketch_width=2)

    # Execute: the two phases (Y_k = G_k Ω, then Z_k = Qᵀ G_k), then the SVD of Z̄
    state = initialize_from_gradients(strat, grads, rank=1, scale=2.0)

    # Assert: B A = u vᵀ = Ḡ / σ = (1,2)ᵀ(1,2) / 5; R_0 = −c σ / s = −(2/15)(7.5)/2 = −0.5
    A, B = state.factors["w"]
    torch.testing.assert_close(B @ A, t([[0.2, 0.4], [0.4, 0.8]]))
    torch.testing.assert_close(state.cores["w"], t([[-0.5]]))
    torch.testing.assert_close(2.0 * B @ state.cores["w"] @ A, t([[-0.2, -0.4], [-0.4, -0.8]]))


def test_fed_sb_seed_initialisation_reads_no_data():
    # Prepare / Execute: init=seed has no phases; A, B orthonormal from the seed, R_0 = 0
    strat = get_strategy("fed-sb", init="seed")
    state = strat.initialize({}, rank=2, scale=1.0, shapes={"w": (5, 3)})
    again = get_strategy("fed-sb", init="seed").initialize({}, rank=2, scale=1.0, shapes={"w": (5, 3)})

    # Assert
    A, B = state.factors["w"]
    assert strat.init_phases == 0 and A.shape == (2, 3) and B.shape == (5, 2)
    torch.testing.assert_close(A @ A.T, torch.eye(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(B.T @ B, torch.eye(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(state.cores["w"], torch.zeros(2, 2))
    torch.testing.assert_close(again.factors["w"][0], A)


def test_fed_sb_by_hand():
    # Prepare: Σ p_k G_k = 3/4 · ones + 1/4 · [[1, 1], [1, −2]] = [[1, 1], [1, 0.25]],
    # whose sign is all ones (uniform weights would give −0.5 there, sign −1).
    # −η sign = −0.5 · ones(2, 2): rank 1, σ_1 = 1, u = v = ±(1, 1)/√2.
    grads = [
        ClientUpload(num_examples=3, grads={"w": t([[1.0, 1.0], [1.0, 1.0]])}),
        ClientUpload(num_examples=1, grads={"w": t([[1.0, 1.0], [1.0, -2.0]])}),
    ]
    strat = get_strategy("fed-sb", init_lr=0.5, init="dense")

    # Execute
    state = initialize_from_gradients(strat, grads, rank=1, scale=2.0)

    # Assert: B A = u vᵀ = −0.5 · ones, R_0 = σ_1 / s = 0.5, s B R_0 A = −0.5 · ones.
    A, B = state.factors["w"]
    torch.testing.assert_close(B @ A, t([[-0.5, -0.5], [-0.5, -0.5]]))
    torch.testing.assert_close(state.cores["w"], t([[0.5]]))

    # Prepare: round 1 cores R_1 = 1 (n = 3) and R_2 = 3 (n = 1).
    uploads = [ClientUpload(num_examples=3, cores={"w": t([[1.0]])}, scale=2.0),
               ClientUpload(num_examples=1, cores={"w": t([[3.0]])}, scale=2.0)]

    # Execute
    result = strat.aggregate(uploads, state)

    # Assert: R̄ = 3/4 · 1 + 1/4 · 3 = 1.5 (uniform: 2); s B R̄ A = 2 · 1.5 · (−0.5) = −1.5.
    R = result.state.cores["w"]
    torch.testing.assert_close(R, t([[1.5]]))
    torch.testing.assert_close(2.0 * B @ R @ A, t([[-1.5, -1.5], [-1.5, -1.5]]))
    assert result.agg_error == pytest.approx(0.0, abs=1e-12)


def test_head_average_by_hand():
    # Prepare: head w_1 = (0, 4), w_2 = (4, 0); 1/4 · (0, 4) + 3/4 · (4, 0) = (3, 1).
    uploads = two_clients()
    uploads[0].head = {"w": t([[0.0], [4.0]])}
    uploads[1].head = {"w": t([[4.0], [0.0]])}

    # Execute
    head = get_strategy("fedavg").aggregate(uploads, GlobalState()).state.head

    # Assert
    torch.testing.assert_close(head["w"], t([[3.0], [1.0]]))


def test_factored_sq_norm_by_hand():
    # Prepare: U_1 V_1 + U_2 V_2 = [[1, 1], [0, 0]] + [[0, 0], [0, 2]] = [[1, 1], [0, 2]],
    # whose squared Frobenius norm is 1 + 1 + 0 + 4 = 6.
    us = [t([[1.0], [0.0]]), t([[0.0], [2.0]])]
    vs = [t([[1.0, 1.0]]), t([[0.0, 1.0]])]

    # Execute / Assert
    assert factored_sq_norm(us, vs) == pytest.approx(6.0, rel=1e-12)
