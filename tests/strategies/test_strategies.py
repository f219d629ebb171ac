"""What every strategy shares: example-count weights, the head, errors, the registry and the
factored norms, against the dense reference (``dense_reference``). Each strategy's own math is
tested in its own file (``test_fedavg.py``, ``test_flora.py``, ``test_lora_fair.py``,
``test_fed_sb.py``); tiny hand-computed cases live in ``test_strategies_handcomputed.py``.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.strategies import STRATEGIES, GlobalState, factored_sq_norm, get_strategy
from fedlora.strategies.fed_sb import FedSB
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.flora import FLoRA
from fedlora.strategies.lora_fair import LoRAFAIR
from tests.strategies.dense_reference import (
    F64,
    dense,
    dense_ideal,
    dense_rel_error,
    global_dense,
    hetero_clients,
    same_rank_clients,
    sb_setup,
    weights,
)

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
