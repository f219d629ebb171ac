"""FFA-LoRA, RoLoRA, FedEx-LoRA and FedSA-LoRA on cases worked out by hand.

Setting (as in ``test_strategies_handcomputed``): two clients, 1 × 1 adapters,
``n = (1, 3)`` so ``p = (1/4, 3/4)``, scale ``s = 1``; the global state before the round
is ``A = 3``, ``B = 5``.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.models.state import upload_tensors
from fedlora.rounds.wire import tensor_bytes
from fedlora.strategies import ClientUpload, GlobalState, get_strategy
from fedlora.strategies.factors import truncated_factors

F64 = torch.float64


def t(v: float) -> torch.Tensor:
    return torch.tensor([[v]], dtype=F64)


def state(A: float = 3.0, B: float = 5.0, rnd: int = 0) -> GlobalState:
    return GlobalState(factors={"w": (t(A), t(B))}, scale=1.0, round=rnd)


def uploads(pairs) -> list[ClientUpload]:
    return [ClientUpload(num_examples=n, factors={"w": (A, B)}, scale=1.0)
            for n, (A, B) in zip((1, 3), pairs, strict=True)]


def test_ffa_lora_averages_b_over_the_frozen_a():
    # Prepare: A stays 3 on both clients (frozen); B_1 = 2, B_2 = 6
    ups = uploads([(t(3), t(2)), (t(3), t(6))])
    # Execute
    agg = get_strategy("ffa-lora").aggregate(ups, state())
    # Assert: B̄ = 2/4 + 18/4 = 5; A unchanged; Σ p s B_k A = 1.5 + 13.5 = 15 = s B̄ A exactly
    A, B = agg.state.factors["w"]
    torch.testing.assert_close(A, t(3))
    torch.testing.assert_close(B, t(5))
    assert agg.agg_error == pytest.approx(0.0, abs=1e-12) and agg.fold == {}


def test_ffa_lora_would_show_an_error_if_a_client_moved_a():
    # Prepare: a client whose A is not the shared one (a broken client): the cross term appears
    ups = uploads([(t(1), t(2)), (t(3), t(6))])
    # Execute
    agg = get_strategy("ffa-lora").aggregate(ups, state())
    # Assert: ideal 1/4·2·1 + 3/4·6·3 = 14, aggregate 5·3 = 15: error 1/14
    assert agg.agg_error == pytest.approx(1 / 14, rel=1e-12)


def test_rolora_alternates_the_averaged_factor():
    strategy = get_strategy("rolora")
    # Round 1 trains B with A frozen at 3: B_1 = 2, B_2 = 6 -> B̄ = 5, A stays 3
    agg1 = strategy.aggregate(uploads([(t(3), t(2)), (t(3), t(6))]), state(B=0.0, rnd=0))
    torch.testing.assert_close(agg1.state.factors["w"][0], t(3))
    torch.testing.assert_close(agg1.state.factors["w"][1], t(5))
    assert agg1.agg_error == pytest.approx(0.0, abs=1e-12)
    # Round 2 trains A with B frozen at 5: A_1 = 1, A_2 = 5 -> Ā = 1/4 + 15/4 = 4, B stays 5
    agg2 = strategy.aggregate(uploads([(t(1), t(5)), (t(5), t(5))]), state(A=3.0, B=5.0, rnd=1))
    torch.testing.assert_close(agg2.state.factors["w"][0], t(4))
    torch.testing.assert_close(agg2.state.factors["w"][1], t(5))
    assert agg2.agg_error == pytest.approx(0.0, abs=1e-12)
    # Assert: the plans alternate (B first: it starts at zero, where A has no gradient)
    assert [strategy.plan(r).train for r in (1, 2, 3)] == [("B",), ("A",), ("B",)]
    assert [strategy.plan(r).upload for r in (1, 2)] == [("B",), ("A",)]


def test_fedex_lora_folds_the_exact_residual():
    # Prepare: A_1 = 1, B_1 = 2; A_2 = 3, B_2 = 4 (ΔW* = 1/4·2 + 3/4·12 = 9.5)
    ups = uploads([(t(1), t(2)), (t(3), t(4))])
    # Execute
    agg = get_strategy("fedex-lora").aggregate(ups, GlobalState())
    # Assert: Ā = 2.5, B̄ = 3.5, s B̄ Ā = 8.75, so the residual is 0.75, as factors
    # [p_1 s B_1, p_2 s B_2, −s B̄] = [0.5, 3, −3.5] times [A_1; A_2; Ā] = [1; 3; 2.5]
    A, B = agg.state.factors["w"]
    torch.testing.assert_close(A, t(2.5))
    torch.testing.assert_close(B, t(3.5))
    fA, fB = agg.fold["w"]
    torch.testing.assert_close(fA, torch.tensor([[1.0], [3.0], [2.5]], dtype=F64))
    torch.testing.assert_close(fB, torch.tensor([[0.5, 3.0, -3.5]], dtype=F64))
    assert float(fB @ fA) == pytest.approx(0.75)
    assert agg.agg_error == pytest.approx(0.0, abs=1e-12)
    # the global update (merged fold + live adapter) is ΔW* = 9.5
    us, vs = agg.state.delta("w")
    assert float(sum(u @ v for u, v in zip(us, vs, strict=True))) == pytest.approx(9.5)


def test_fedex_lora_accumulates_folds_over_rounds():
    # Prepare: a second round from the first one's state
    strategy = get_strategy("fedex-lora")
    first = strategy.aggregate(uploads([(t(1), t(2)), (t(3), t(4))]), GlobalState())
    # Execute: both clients move to A = 2, B = 2 (ΔW = 4): the mean is exact, no new residual
    second = strategy.aggregate(uploads([(t(2), t(2)), (t(2), t(2))]), first.state)
    # Assert: merged holds the first residual (0.75) plus a zero one; live adapter 2·2 = 4
    us, vs = second.state.delta("w")
    assert float(sum(u @ v for u, v in zip(us, vs, strict=True))) == pytest.approx(0.75 + 4.0)
    assert second.agg_error == pytest.approx(0.0, abs=1e-12)


def test_fedsa_lora_averages_a_and_never_sees_b():
    # Prepare: uploads carry A only (B is None: it stayed on the client)
    ups = uploads([(t(1), None), (t(5), None)])
    # Execute
    agg = get_strategy("fedsa-lora").aggregate(ups, state(A=3.0, B=0.0))
    # Assert: Ā = 1/4 + 15/4 = 4; B stays the round-0 value; no global update to compare with
    torch.testing.assert_close(agg.state.factors["w"][0], t(4))
    torch.testing.assert_close(agg.state.factors["w"][1], t(0))
    assert agg.agg_error is None


@pytest.mark.parametrize("name", ["ffa-lora", "rolora", "fedsa-lora"])
def test_half_uploads_are_at_most_55_percent_of_fedavg(name):
    # Prepare: MiniLM-shaped adapters (6 layers × query/value, 384 × 384, r = 8) and its 5-way head
    g = torch.Generator().manual_seed(0)
    factors = {f"l{i}.{m}": (torch.randn(8, 384, generator=g), torch.randn(384, 8, generator=g))
               for i in range(6) for m in ("query", "value")}
    head = {"classifier.weight": torch.randn(5, 384, generator=g), "classifier.bias": torch.zeros(5)}
    up = ClientUpload(num_examples=1, factors=factors, head=head)
    # Execute: what each strategy's round-1 plan sends, against FedAvg's
    full = tensor_bytes(upload_tensors(up, get_strategy("fedavg").plan(1)))
    half = tensor_bytes(upload_tensors(up, get_strategy(name).plan(1)))
    # Assert
    assert half / full <= 0.55, half / full


def test_flexlora_aggregates_exactly_and_truncates_per_rank():
    # Prepare: ranks 1 and 2; p s B_k A_k = diag(1, 0) and diag(0, 3), so ΔW* = diag(1, 3)
    e1, e2 = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[0.0, 1.0]], dtype=F64)
    one = ClientUpload(num_examples=1, factors={"w": (e1, 4 * e1.T)}, scale=1.0)
    A2, B2 = torch.cat([e2, 0 * e1]), torch.cat([4 * e2.T, 0 * e1.T], 1)    # rank 2, one direction zero
    two = ClientUpload(num_examples=3, factors={"w": (A2, B2)}, scale=1.0)
    # Execute
    agg = get_strategy("flexlora").aggregate([one, two], GlobalState())
    # Assert: the global update is ΔW* exactly; rank 1 keeps σ = 3 and loses σ = 1:
    # error 1/√10; rank 2 loses nothing
    A, B = agg.state.factors["w"]
    torch.testing.assert_close(agg.state.scale * B @ A, torch.diag(torch.tensor([1.0, 3.0], dtype=F64)))
    assert agg.agg_error == pytest.approx(0.0, abs=1e-12)
    assert agg.metrics["truncation_error_per_client"] == pytest.approx([10 ** -0.5, 0.0], abs=1e-12)
    # a rank-1 client of scale 4 starts from 4 · B_1 A_1 = diag(0, 3), split evenly between A and B
    (A1, B1), S = truncated_factors(A, B, agg.state.scale, rank=1, slot_scale=4.0)
    torch.testing.assert_close(4.0 * B1 @ A1, torch.diag(torch.tensor([0.0, 3.0], dtype=F64)))
    assert float(A1.norm()) == pytest.approx(3 ** 0.5 / 2) and float(B1.norm()) == pytest.approx(3 ** 0.5 / 2)
    torch.testing.assert_close(S, torch.tensor([3.0, 1.0], dtype=F64))
    # a rank-3 slot gets ΔW* exactly, its third direction zero
    (A3, B3), _ = truncated_factors(A, B, 1.0, rank=3, slot_scale=2.0)
    torch.testing.assert_close(2.0 * B3 @ A3, torch.diag(torch.tensor([1.0, 3.0], dtype=F64)))
    assert float(A3[2].abs().sum()) == 0.0


def test_flexlora_starts_fresh_then_from_the_truncation():
    strategy = get_strategy("flexlora")
    assert strategy.plan(1).start == "fresh" and strategy.plan(2).start == "global"
    assert strategy.heterogeneous_ranks and not strategy.sum_only
