"""The server learning rate (``strategies/server_step.py``), hand-computed.

Setting: two clients with ``n = (1, 3)``, so ``p = (1/4, 3/4)``, 1 × 1 adapters on one layer ``w``;
the last global state is ``A = 1, B = 0`` and head ``h = 1``:

    client 1: A = 1, B = 2, h = 2;  client 2: A = 3, B = 4, h = 4
    mean:     Ā = 2.5, B̄ = 3.5, h̄ = 3.5
    η = 2:    A = 1 + 2 (2.5 − 1) = 4,  B = 0 + 2 · 3.5 = 7,  h = 1 + 2 (3.5 − 1) = 6
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedlora.strategies import ClientUpload, GlobalState, get_strategy
from fedlora.strategies.robust import Robust
from fedlora.strategies.server_step import ServerStep

F64 = torch.float64


def t(x: float) -> torch.Tensor:
    return torch.tensor([[x]], dtype=F64)


def state(round_: int = 0, cores: bool = False) -> GlobalState:
    return GlobalState(factors={"w": (t(1.0), t(0.0))}, scale=1.0, head={"h": t(1.0)}, round=round_,
                       cores={"w": t(0.5)} if cores else None)


def uploads(cores: bool = False) -> list[ClientUpload]:
    return [ClientUpload(num_examples=n, factors={"w": (t(a), t(b))}, scale=1.0, head={"h": t(h)},
                         cores={"w": t(r)} if cores else {})
            for n, a, b, h, r in ((1, 1.0, 2.0, 2.0, 1.0), (3, 3.0, 4.0, 4.0, 2.0))]


def values(agg) -> tuple[float, float, float]:
    A, B = agg.state.factors["w"]
    return float(A), float(B), float(agg.state.head["h"])


def test_fedavg_moves_twice_as_far_from_the_last_global_state():
    plain = get_strategy("fedavg").aggregate(uploads(), state())
    stepped = ServerStep(get_strategy("fedavg"), 2.0).aggregate(uploads(), state())
    assert values(plain) == pytest.approx((2.5, 3.5, 3.5))
    assert values(stepped) == pytest.approx((4.0, 7.0, 6.0))
    assert stepped.metrics["server_lr"] == 2.0
    assert stepped.agg_error == plain.agg_error        # how the strategy averaged, before the step


def test_a_rate_of_one_is_the_strategy_itself_and_a_half_stops_halfway():
    assert values(ServerStep(get_strategy("fedavg"), 1.0).aggregate(uploads(), state())) == (2.5, 3.5, 3.5)
    assert values(ServerStep(get_strategy("fedavg"), 0.5).aggregate(uploads(), state())) == pytest.approx(
        (1.75, 1.75, 2.25))


def test_frozen_shared_and_personal_factors_do_not_move():
    # FFA-LoRA: A is shared and frozen (the global 1), only B travels: B = 0 + 2 · 3.5 = 7
    assert values(ServerStep(get_strategy("ffa-lora"), 2.0).aggregate(uploads(), state())) == pytest.approx(
        (1.0, 7.0, 6.0))
    # FedSA-LoRA: B stays on the clients (the global B is the starting 0), A travels: 1 + 2 · 1.5 = 4
    assert values(ServerStep(get_strategy("fedsa-lora"), 2.0).aggregate(uploads(), state())) == pytest.approx(
        (4.0, 0.0, 6.0))
    # RoLoRA: round 1 trains and sends B alone (A is the global 1), round 2 A alone (B the global 0)
    rolora = ServerStep(get_strategy("rolora"), 2.0)
    assert values(rolora.aggregate(uploads(), state(round_=0))) == pytest.approx((1.0, 7.0, 6.0))
    assert values(rolora.aggregate(uploads(), state(round_=1))) == pytest.approx((4.0, 0.0, 6.0))


def test_fed_sb_moves_its_cores_and_not_its_frozen_factors():
    # R̄ = 1/4 · 1 + 3/4 · 2 = 1.75 from R = 0.5: 0.5 + 2 (1.75 − 0.5) = 3
    agg = ServerStep(get_strategy("fed-sb"), 2.0).aggregate(uploads(cores=True), state(cores=True))
    assert float(agg.state.cores["w"]) == pytest.approx(3.0)
    assert values(agg) == pytest.approx((1.0, 0.0, 6.0))


def test_secure_aggregations_mean_takes_the_same_step():
    mean = ClientUpload(num_examples=1, factors={"w": (t(2.5), t(3.5))}, scale=1.0, head={"h": t(3.5)})
    agg = ServerStep(get_strategy("fedavg"), 2.0).aggregate_mean(mean, 2, state())
    assert values(agg) == pytest.approx((4.0, 7.0, 6.0))


def test_it_moves_the_defended_aggregate():
    # uniform weights: Ā = 2, B̄ = 3, h̄ = 3; η = 2: A = 3, B = 6, h = 5
    robust = Robust(get_strategy("fedavg"), weighting="uniform")
    assert values(ServerStep(robust, 2.0).aggregate(uploads(), state())) == pytest.approx((3.0, 6.0, 5.0))


def product(factors) -> float:
    A, B = factors
    return float((B @ A).squeeze())


def test_flora_folds_twice_the_clients_mean_update():
    # the exact mean Σ p_k s B_k A_k = 1/4 · 2 + 3/4 · 12 = 9.5, folded twice: 19; clients restart fresh
    fresh = GlobalState(factors=None, head={"h": t(1.0)})
    agg = ServerStep(get_strategy("flora"), 2.0).aggregate(uploads(), fresh)
    assert product(agg.fold["w"]) == pytest.approx(19.0)
    assert product(agg.state.merged["w"]) == pytest.approx(19.0)
    assert agg.state.factors is None and float(agg.state.head["h"]) == pytest.approx(6.0)
    assert agg.agg_error == pytest.approx(0.0, abs=1e-12)   # FLoRA's own exactness, before the step


def test_fedex_lora_moves_the_model_in_weight_space():
    # W_old = s B0 A0 = 0; the clients' mean model W̄ = 9.5 (live s B̄ Ā = 8.75, residual fold 0.75).
    # η = 2: W = 0 + 2 · 9.5 = 19, the clients start from (Ā, B̄), so the fold is 19 − 8.75 = 10.25
    plain = get_strategy("fedex-lora").aggregate(uploads(), state())
    agg = ServerStep(get_strategy("fedex-lora"), 2.0).aggregate(uploads(), state())
    assert product(plain.fold["w"]) == pytest.approx(0.75)
    assert product(agg.fold["w"]) == pytest.approx(10.25)
    assert product(agg.state.merged["w"]) == pytest.approx(10.25)
    assert values(agg) == pytest.approx((2.5, 3.5, 6.0))
    # a second round from there: the folds add up, and the model is again the old one plus 2 × the update
    again = ServerStep(get_strategy("fedex-lora"), 2.0).aggregate(uploads(), replace(agg.state, round=1))
    # clients' mean model 9.5 + 10.25 = 19.75 against the old 10.25 + 8.75 = 19: W = 19 + 2 · 0.75 = 20.5
    assert product(again.state.merged["w"]) + 8.75 == pytest.approx(20.5)


def test_flexlora_is_refused():
    with pytest.raises(ValueError, match="flexlora restarts its clients .* use --server-lr 1"):
        ServerStep(get_strategy("flexlora"), 2.0)


@pytest.mark.parametrize("lr", [0.0, float("inf")])  # inf was taken: the state went nan
def test_a_rate_that_is_not_positive_and_finite_is_refused(lr):
    with pytest.raises(ValueError, match="must be finite and > 0"):
        ServerStep(get_strategy("fedavg"), lr)
