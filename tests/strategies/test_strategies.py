"""Aggregation strategies against a slow, obvious dense reference.

The reference builds every update as an explicit ``d_out × d_in`` matrix in float64:
``ΔW_k = s_k B_k A_k``, ``ΔW* = Σ p_k ΔW_k`` with ``p_k = n_k / Σ n``, and the
relative error ``sqrt(Σ_l ‖agg_l − ΔW*_l‖²) / sqrt(Σ_l ‖ΔW*_l‖²)`` with
``torch.linalg.norm``. The strategies themselves never form such a matrix.
Tiny hand-computed cases live in ``test_strategies_handcomputed.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from fedlora.strategies import (
    STRATEGIES,
    ClientUpload,
    GlobalState,
    factored_sq_norm,
    get_strategy,
)
from fedlora.strategies.fed_sb import FedSB, initialize_from_gradients
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.flora import FLoRA, compact
from fedlora.strategies.lora_fair import LoRAFAIR

D_IN, D_OUT = 16, 12
LAYERS = {"q": (D_OUT, D_IN), "v": (D_IN, 10)}   # layer -> (d_out, d_in)
F64 = torch.float64


# ----------------------------------------------------------------------------- reference


def weights(uploads: Sequence[ClientUpload]) -> list[float]:
    total = sum(u.num_examples for u in uploads)
    return [u.num_examples / total for u in uploads]


def dense(A: torch.Tensor, B: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    return s * B.double() @ A.double()


def dense_ideal(uploads: Sequence[ClientUpload], layer: str, uniform: bool = False) -> torch.Tensor:
    """``Σ p_k s_k B_k A_k`` as a dense float64 matrix (``p_k = 1/K`` if ``uniform``)."""
    p = [1.0 / len(uploads)] * len(uploads) if uniform else weights(uploads)
    return sum(pk * dense(*u.factors[layer], u.scale) for pk, u in zip(p, uploads, strict=True))


def dense_ideal_sb(uploads: Sequence[ClientUpload], state: GlobalState, layer: str) -> torch.Tensor:
    """``Σ p_k s B R_k A`` for LoRA-SB clients sharing ``state``'s A, B and scale."""
    A, B = state.factors[layer]
    return sum(pk * state.scale * B.double() @ u.cores[layer].double() @ A.double()
               for pk, u in zip(weights(uploads), uploads, strict=True))


def dense_rel_error(agg: dict[str, torch.Tensor], ideal: dict[str, torch.Tensor]) -> float:
    num = sum(torch.linalg.norm(agg[k].double() - ideal[k].double()) ** 2 for k in ideal)
    den = sum(torch.linalg.norm(ideal[k].double()) ** 2 for k in ideal)
    return float((num / den) ** 0.5)


def global_dense(state: GlobalState, layer: str) -> torch.Tensor:
    """The global live adapter's dense update ``s B A`` (or ``s B R A``)."""
    A, B = state.factors[layer]
    if state.cores is not None:
        return state.scale * B.double() @ state.cores[layer].double() @ A.double()
    return dense(A, B, state.scale)


def make_client(gen: torch.Generator, n: int, rank: int, alpha: float = 16.0,
                layers: dict[str, tuple[int, int]] | None = None, dtype=F64,
                head: bool = False) -> ClientUpload:
    layers = layers or {"q": (D_OUT, D_IN)}
    factors = {
        name: (torch.randn(rank, d_in, generator=gen, dtype=dtype),
               torch.randn(d_out, rank, generator=gen, dtype=dtype))
        for name, (d_out, d_in) in layers.items()
    }
    heads = {"w": torch.randn(3, 4, generator=gen, dtype=dtype),
             "b": torch.randn(3, generator=gen, dtype=dtype)} if head else {}
    return ClientUpload(num_examples=n, factors=factors, scale=alpha / rank, head=heads)


def hetero_clients(seed: int = 0, dtype=F64, layers=None) -> list[ClientUpload]:
    gen = torch.Generator().manual_seed(seed)
    return [make_client(gen, n, r, alpha=a, layers=layers, dtype=dtype)
            for n, r, a in [(10, 2, 4.0), (30, 4, 16.0), (60, 8, 8.0)]]


def same_rank_clients(seed: int = 0, n=(10, 30, 60), rank: int = 4, layers=None,
                      head: bool = False) -> list[ClientUpload]:
    gen = torch.Generator().manual_seed(seed)
    return [make_client(gen, nk, rank, alpha=8.0, layers=layers, head=head) for nk in n]


def sb_setup(seed: int = 0, n=(5, 15, 30), rank: int = 3, scale: float = 2.0):
    """An initialised Fed-SB state and clients uploading random cores."""
    gen = torch.Generator().manual_seed(seed)
    layers = {"q": (10, 12), "v": (12, 8)}
    strat = FedSB(init_lr=1e-3, init="dense", seed=7)
    grads = [ClientUpload(num_examples=nk,
                          grads={k: torch.randn(*shape, generator=gen, dtype=F64)
                                 for k, shape in layers.items()}) for nk in n]
    state = initialize_from_gradients(strat, grads, rank=rank, scale=scale)
    clients = [ClientUpload(num_examples=nk, scale=scale,
                            cores={k: torch.randn(rank, rank, generator=gen, dtype=F64)
                                   for k in layers}) for nk in n]
    return strat, grads, state, clients


# ----------------------------------------------------------------------------- FLoRA


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


# ----------------------------------------------------------------------------- Fed-SB


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


# ----------------------------------------------------------------------------- FedAvg


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


# ----------------------------------------------------------------------------- LoRA-FAIR


def ridge_reference(uploads, layer: str, lam: float) -> torch.Tensor:
    """ΔB of ``min ‖ΔW* − s(B̄+ΔB)Ā‖² + λ‖ΔB‖²`` as a dense least-squares problem on
    ``vec(ΔB)``: ``vec(ΔB Ā) = (Āᵀ ⊗ I) vec(ΔB)`` (column-major vec)."""
    p = weights(uploads)
    s = uploads[0].scale
    A_bar = sum(pk * u.factors[layer][0].double() for pk, u in zip(p, uploads, strict=True))
    B_bar = sum(pk * u.factors[layer][1].double() for pk, u in zip(p, uploads, strict=True))
    target = dense_ideal(uploads, layer) - s * B_bar @ A_bar           # (d_out, d_in)
    d_out, r = B_bar.shape
    M = s * torch.kron(A_bar.T.contiguous(), torch.eye(d_out, dtype=F64))             # (d_out d_in, d_out r)
    M = torch.cat([M, lam ** 0.5 * torch.eye(d_out * r, dtype=F64)])
    y = torch.cat([target.T.reshape(-1), torch.zeros(d_out * r, dtype=F64)])
    vec = torch.linalg.lstsq(M, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return vec.reshape(r, d_out).T


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


def test_lora_fair_rejects_negative_lambda():
    # Execute / Assert
    with pytest.raises(ValueError, match="λ"):
        LoRAFAIR(lam=-0.1)


# ----------------------------------------------------------------------------- weights


def _global_update(name: str, uploads, state=None) -> torch.Tensor:
    strat = get_strategy(name)
    result = strat.aggregate(uploads, state or GlobalState())
    if name == "flora":
        return dense(*result.fold["q"])
    return global_dense(result.state, "q")


@pytest.mark.parametrize("name", ["fedavg", "flora", "lora-fair"])
def test_weights_are_example_counts_not_uniform(name):
    # Prepare: n = (1, 9, 90); uniform averaging gives a very different result.
    uploads = same_rank_clients(seed=8, n=(1, 9, 90))
    p = weights(uploads)
    if name == "fedavg":
        A_bar = sum(pk * u.factors["q"][0] for pk, u in zip(p, uploads, strict=True))
        B_bar = sum(pk * u.factors["q"][1] for pk, u in zip(p, uploads, strict=True))
        expected = dense(A_bar, B_bar, uploads[0].scale)
        A_uni = sum(u.factors["q"][0] for u in uploads) / 3
        B_uni = sum(u.factors["q"][1] for u in uploads) / 3
        uniform = dense(A_uni, B_uni, uploads[0].scale)
    else:
        expected = dense_ideal(uploads, "q")
        uniform = dense_ideal(uploads, "q", uniform=True)

    # Execute
    got = _global_update(name, uploads)

    # Assert
    if name == "lora-fair":   # approaches the weighted ideal, far from the uniform one
        assert dense_rel_error({"q": got}, {"q": expected}) < 0.5 * dense_rel_error(
            {"q": got}, {"q": uniform})
    else:
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert dense_rel_error({"q": uniform}, {"q": expected}) > 0.1


def test_fed_sb_weights_are_example_counts_not_uniform():
    # Prepare
    strat, _, state, clients = sb_setup(seed=9, n=(1, 2, 97))
    p = weights(clients)

    # Execute
    R = strat.aggregate(clients, state).state.cores["q"]

    # Assert
    weighted = sum(pk * u.cores["q"] for pk, u in zip(p, clients, strict=True))
    uniform = sum(u.cores["q"] for u in clients) / 3
    torch.testing.assert_close(R, weighted)
    assert torch.linalg.norm(R - uniform) > 0.1 * torch.linalg.norm(uniform)


# ----------------------------------------------------------------------------- head


@pytest.mark.parametrize("name", ["fedavg", "flora", "lora-fair", "fed-sb"])
def test_every_strategy_averages_the_head_by_weight(name):
    # Prepare
    gen = torch.Generator().manual_seed(11)
    heads = [{"w": torch.randn(3, 4, generator=gen, dtype=F64),
              "b": torch.randn(3, generator=gen, dtype=F64)} for _ in range(3)]
    n = (2, 3, 15)
    if name == "fed-sb":
        strat, _, state, clients = sb_setup(seed=11, n=n)
    else:
        strat, state, clients = get_strategy(name), GlobalState(), same_rank_clients(seed=11, n=n)
    for u, h in zip(clients, heads, strict=True):
        u.head = h
    p = [nk / sum(n) for nk in n]

    # Execute
    head = strat.aggregate(clients, state).state.head

    # Assert
    assert set(head) == {"w", "b"}
    for key in ("w", "b"):
        torch.testing.assert_close(head[key], sum(pk * h[key] for pk, h in zip(p, heads,
                                                                                strict=True)))


def test_no_head_gives_empty_head():
    # Execute
    result = FedAvg().aggregate(same_rank_clients(), GlobalState())

    # Assert
    assert result.state.head == {}


# ----------------------------------------------------------------------------- errors


def _round_for(name: str):
    if name == "fed-sb":
        strat, _, state, clients = sb_setup(seed=12)
        return strat, state, clients
    return get_strategy(name), GlobalState(), same_rank_clients(seed=12)


@pytest.mark.parametrize("name", ["fedavg", "flora", "lora-fair", "fed-sb"])
def test_empty_round_raises_value_error(name):
    # Prepare
    strat, state, _ = _round_for(name)

    # Execute / Assert
    with pytest.raises(ValueError, match="empty round"):
        strat.aggregate([], state)


def test_fed_sb_initialize_on_empty_round_raises():
    # Execute / Assert
    with pytest.raises(ValueError, match="empty round"):
        FedSB().init_reduce(0, [], {})


@pytest.mark.parametrize("count", [0, -3])
@pytest.mark.parametrize("name", ["fedavg", "flora", "lora-fair", "fed-sb"])
def test_non_positive_num_examples_raises(name, count):
    # Prepare
    strat, state, clients = _round_for(name)
    clients[1].num_examples = count

    # Execute / Assert
    with pytest.raises(ValueError, match="num_examples > 0"):
        strat.aggregate(clients, state)


@pytest.mark.parametrize("name", ["fedavg", "lora-fair"])
def test_mismatched_ranks_point_to_flora(name):
    # Prepare
    uploads = hetero_clients(seed=13)

    # Execute / Assert
    with pytest.raises(ValueError, match="flora") as info:
        get_strategy(name).aggregate(uploads, GlobalState())
    assert "[2, 4, 8]" in str(info.value)


@pytest.mark.parametrize("name", ["fedavg", "lora-fair"])
def test_mismatched_scales_raise(name):
    # Prepare
    uploads = same_rank_clients(seed=14)
    uploads[2].scale = 3.0

    # Execute / Assert
    with pytest.raises(ValueError, match="scale"):
        get_strategy(name).aggregate(uploads, GlobalState())


def test_unknown_strategy_lists_choices():
    # Execute / Assert
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'") as info:
        get_strategy("fedprox")
    for name in ("fedavg", "flora", "lora-fair", "fed-sb"):
        assert name in str(info.value)


def test_registry_names_classes_and_options():
    # Execute
    fair = get_strategy("lora-fair", lam=0.25)
    sb = get_strategy("fed-sb", init_lr=0.5, seed=3)

    # Assert
    assert {name: STRATEGIES[name] for name in ("fedavg", "flora", "lora-fair", "fed-sb")} == {
        "fedavg": FedAvg, "flora": FLoRA, "lora-fair": LoRAFAIR, "fed-sb": FedSB}
    assert isinstance(fair, LoRAFAIR) and fair.lam == 0.25
    assert sb.init_lr == 0.5 and sb.seed == 3
    for name, cls in STRATEGIES.items():
        info = cls().describe()
        assert info["name"] == name
    assert FLoRA().describe()["heterogeneous_ranks"] is True
    assert FLoRA().describe()["sum_only"] is False
    assert FedSB().describe()["init_phases"] == 2
    assert FedSB(init="dense").describe()["init_phases"] == 1
    assert FedSB(init="seed").describe()["init_phases"] == 0
    assert FedSB().describe()["plan"]["train"] == "R"


def test_lora_strategies_have_no_initialisation_phases():
    # Execute / Assert: no phases, and the default first state (None)
    assert FedAvg().init_phases == 0
    assert FedAvg().initialize({}, rank=2, scale=1.0, shapes={"q": (4, 4)}) is None
    with pytest.raises(NotImplementedError):
        FedAvg().init_probes(0, {"q": (4, 4)}, 2, {})


# ----------------------------------------------------------------------------- norms


def test_factored_sq_norm_equals_dense_frobenius():
    # Prepare: factor pairs of different ranks, float32 input (computed in float64).
    gen = torch.Generator().manual_seed(15)
    ranks = (1, 3, 5)
    us = [torch.randn(7, r, generator=gen) for r in ranks]
    vs = [torch.randn(r, 9, generator=gen) for r in ranks]
    X = sum(u.double() @ v.double() for u, v in zip(us, vs, strict=True))

    # Execute
    got = factored_sq_norm(us, vs)

    # Assert
    assert isinstance(got, float)
    assert got == pytest.approx(float(torch.linalg.norm(X) ** 2), rel=1e-12)


def test_factored_sq_norm_of_nothing_is_zero():
    # Execute / Assert
    assert factored_sq_norm([], []) == 0.0


def test_global_state_delta_sums_merged_and_live_adapter():
    # Prepare
    gen = torch.Generator().manual_seed(16)
    mA, mB = torch.randn(2, 5, generator=gen, dtype=F64), torch.randn(4, 2, generator=gen,
                                                                     dtype=F64)
    A, B = torch.randn(3, 5, generator=gen, dtype=F64), torch.randn(4, 3, generator=gen,
                                                                   dtype=F64)
    R = torch.randn(3, 3, generator=gen, dtype=F64)
    lora = GlobalState(factors={"q": (A, B)}, scale=0.5, merged={"q": (mA, mB)})
    sb = GlobalState(factors={"q": (A, B)}, scale=0.5, cores={"q": R})

    # Execute
    lora_us, lora_vs = lora.delta("q")
    sb_us, sb_vs = sb.delta("q")

    # Assert
    def total(us, vs):
        return sum(u @ v for u, v in zip(us, vs, strict=True))

    torch.testing.assert_close(total(lora_us, lora_vs), mB @ mA + 0.5 * B @ A)
    torch.testing.assert_close(total(sb_us, sb_vs), 0.5 * B @ R @ A)
    assert GlobalState().delta("q") == ([], [])
