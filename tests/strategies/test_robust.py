"""The server's weights, norm bounding and robust means (``strategies/robust.py``), hand-computed.

FFA-LoRA setting: one layer ``w`` with ``A = [[1, 0]]`` frozen and shared (a unit row, so
``‖ΔW‖ = s ‖ΔB‖``), ``B̄ = 0`` (2×1), scale 1, no head; clients differ in ``B`` only.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedlora.strategies import ClientLevelDP, ClientUpload, GlobalState, get_strategy
from fedlora.strategies.dp import global_tensors, updates
from fedlora.strategies.robust import Robust, shrink, update_norm

F64 = torch.float64
A0 = torch.tensor([[1.0, 0.0]], dtype=F64)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def ffa_state() -> GlobalState:
    return GlobalState(factors={"w": (A0, torch.zeros(2, 1, dtype=F64))}, scale=1.0)


def ffa_upload(b, n: int = 10) -> ClientUpload:
    return ClientUpload(num_examples=n, factors={"w": (A0, t([[b[0]], [b[1]]]))}, scale=1.0)


def new_b(agg) -> list[float]:
    return agg.state.factors["w"][1].flatten().tolist()


def test_a_claim_of_a_billion_examples_weighs_what_a_capped_honest_client_weighs():
    honest = [ffa_upload([1, 0], n=10), ffa_upload([0, 1], n=10)]
    robust = Robust(get_strategy("ffa-lora"), max_examples=10)
    liar = robust.aggregate([*honest, ffa_upload([9, 9], n=10**9)], ffa_state())
    capped = robust.aggregate([*honest, ffa_upload([9, 9], n=10)], ffa_state())
    assert new_b(liar) == pytest.approx(new_b(capped))
    assert new_b(liar) == pytest.approx([10 / 3, 10 / 3])
    assert robust.round_report()["capped_claims"] == 0  # the last round's: the honest claim
    robust.aggregate([*honest, ffa_upload([9, 9], n=10**9)], ffa_state())
    assert robust.round_report()["capped_claims"] == 1
    # without the cap the liar sets the global B by itself
    plain = get_strategy("ffa-lora").aggregate([*honest, ffa_upload([9, 9], n=10**9)], ffa_state())
    assert new_b(plain) == pytest.approx([9, 9], abs=1e-6)


def test_uniform_weighting_ignores_the_claims():
    ups = [ffa_upload([1, 0], n=1), ffa_upload([0, 1], n=3)]
    agg = Robust(get_strategy("ffa-lora"), weighting="uniform").aggregate(ups, ffa_state())
    assert new_b(agg) == pytest.approx([0.5, 0.5])  # by claims it would be [0.25, 0.75]


def test_norm_bound_scales_the_outlier_to_m_times_the_median():
    # update norms 1, 2, 50: median 2, bound 2 × 2 = 4, so the third is scaled by 4/50
    ups = [ffa_upload([1, 0]), ffa_upload([0, 2]), ffa_upload([30, 40])]
    robust = Robust(get_strategy("ffa-lora"), norm_bound=2.0)
    agg = robust.aggregate(ups, ffa_state())
    assert new_b(agg) == pytest.approx([(1 + 0 + 2.4) / 3, (0 + 2 + 3.2) / 3])
    assert robust.bounded == [2]  # its position: these uploads carry no client id


def test_sign_flip_beyond_the_bound_is_clipped_too():
    ups = [ffa_upload([1, 0]), ffa_upload([1, 0]), ffa_upload([-100, 0])]
    agg = Robust(get_strategy("ffa-lora"), norm_bound=1.0).aggregate(ups, ffa_state())
    assert new_b(agg) == pytest.approx([(1 + 1 - 1) / 3, 0])


def test_krum_leaves_out_the_sign_flipped_client_and_keeps_the_weights():
    # Prepare: three honest updates near (1, 0) and one flipped, (-1, 0); K = 4, f = 1, each
    # client's score is its squared distance to its K - f - 2 = 1 nearest other client:
    # 0.01, 0.01, 0.01 (honest) and 1.9² = 3.61 (the flipped one)
    ups = [ffa_upload([1, 0], n=10), ffa_upload([1.1, 0], n=30), ffa_upload([0.9, 0], n=10),
           ffa_upload([-1, 0], n=10)]
    ups = [replace(u, client=c) for u, c in zip(ups, (7, 3, 5, 2), strict=True)]  # client ids
    robust = Robust(get_strategy("ffa-lora"), mean="krum")
    # Act
    agg = robust.aggregate(ups, ffa_state())
    # Assert: the example-weighted mean of the honest three, (10 + 33 + 9) / 50, exact, and the
    # report names the flipped client (id 2)
    assert new_b(agg) == pytest.approx([1.04, 0.0])
    report = robust.round_report()
    assert report["krum_dropped"] == [2] and report["krum_left_out"] == 1
    assert agg.agg_error == pytest.approx(0.0, abs=1e-12)


def test_update_norm_from_factors_equals_the_dense_norm():
    g = torch.Generator().manual_seed(0)
    A0, B0 = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    A1, B1 = A0 + torch.randn(3, 5, generator=g, dtype=F64), B0 + torch.randn(4, 3, generator=g, dtype=F64)
    head0, head1 = t([[1.0, 2.0]]), t([[1.5, 0.0]])
    state = GlobalState(factors={"w": (A0, B0)}, scale=0.5, head={"cls": head0})
    up = ClientUpload(num_examples=1, factors={"w": (A1, B1)}, scale=0.5, head={"cls": head1})
    plan = get_strategy("fedavg").plan(1)
    delta = updates([up], global_tensors(state, plan), plan)[0]
    dense = 0.5 * (B1 @ A1 - B0 @ A0)                                           # the slow reference
    expect = (dense.pow(2).sum() + (head1 - head0).pow(2).sum()).sqrt()
    assert update_norm(delta, 1.0, state, plan, 0.5) == pytest.approx(float(expect), rel=1e-12)


def test_lora_sb_update_norm_from_cores_equals_the_dense_norm():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 6, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)
    R0, R1 = torch.randn(2, 2, generator=g, dtype=F64), torch.randn(2, 2, generator=g, dtype=F64)
    state = GlobalState(factors={"w": (A, B)}, scale=3.0, cores={"w": R0})
    up = ClientUpload(num_examples=1, cores={"w": R1})
    plan = get_strategy("fed-sb").plan(1)
    delta = updates([up], global_tensors(state, plan), plan)[0]
    expect = (3.0 * B @ (R1 - R0) @ A).pow(2).sum().sqrt()
    assert update_norm(delta, 1.0, state, plan, 3.0) == pytest.approx(float(expect), rel=1e-12)


def test_fedavg_bound_found_by_bisection_when_both_factors_move():
    g = torch.Generator().manual_seed(2)
    A0 = torch.randn(2, 4, generator=g, dtype=F64)
    state = GlobalState(factors={"w": (A0, torch.zeros(3, 2, dtype=F64))}, scale=1.0)
    ups = [ClientUpload(num_examples=1, scale=1.0,
                        factors={"w": (A0 + f * torch.randn(2, 4, generator=g, dtype=F64),
                                       f * torch.randn(3, 2, generator=g, dtype=F64))})
           for f in (0.1, 0.2, 0.3, 10.0)]
    plan = get_strategy("fedavg").plan(1)
    deltas = updates(ups, global_tensors(state, plan), plan)
    norms = [update_norm(d, 1.0, state, plan, 1.0) for d in deltas]
    bound = 1.5 * (sorted(norms)[1] + sorted(norms)[2]) / 2                     # 1.5 × the median
    c = shrink(deltas[3], norms[3], bound, state, plan, 1.0)
    assert 0 < c < 1 and update_norm(deltas[3], c, state, plan, 1.0) == pytest.approx(bound, rel=1e-9)
    honest = zip(deltas[:3], norms[:3], strict=True)
    assert [shrink(d, n, bound, state, plan, 1.0) for d, n in honest] == [1.0, 1.0, 1.0]
    robust = Robust(get_strategy("fedavg"), norm_bound=1.5)
    agg = robust.aggregate(ups, state)
    assert robust.bounded == [3]
    A_mean = sum(A0 + (c if k == 3 else 1.0) * deltas[k][("A", "w")] for k in range(4)) / 4
    assert torch.allclose(agg.state.factors["w"][0], A_mean)


def test_trimmed_mean_and_median_of_fed_sb_cores():
    state = GlobalState(factors={"w": (t([[1.0]]), t([[1.0]]))}, scale=1.0, cores={"w": t([[0.0]])},
                        head={"cls": t([0.0])})
    ups = [ClientUpload(num_examples=n, cores={"w": t([[v]])}, head={"cls": t([-v])})
           for n, v in zip((1, 1, 1, 1, 50), (1.0, 2.0, 3.0, 4.0, 100.0), strict=True)]
    agg = Robust(get_strategy("fed-sb"), mean="trimmed", trim=0.2).aggregate(ups, state)
    assert agg.state.cores["w"].item() == pytest.approx(3.0)      # mean of 2, 3, 4 (1 and 100 dropped)
    assert agg.state.head["cls"].item() == pytest.approx(-3.0)
    assert agg.agg_error is None
    med = Robust(get_strategy("fed-sb"), mean="median").aggregate(ups, state)
    assert med.state.cores["w"].item() == pytest.approx(3.0)
    even = Robust(get_strategy("fed-sb"), mean="median").aggregate(ups[1:], state)
    assert even.state.cores["w"].item() == pytest.approx(3.5)     # between 3 and 4 of 2, 3, 4, 100
    plain = get_strategy("fed-sb").aggregate(ups, state)          # weighted by claims: the outlier wins
    assert plain.state.cores["w"].item() == pytest.approx((1 + 2 + 3 + 4 + 50 * 100) / 54)


@pytest.mark.parametrize("inner, kw, message", [
    ("flora", {"norm_bound": 2.0}, "can only run on a sum-only strategy"),
    ("lora-fair", {"mean": "median"}, "can only run on a sum-only strategy"),
    ("fedsa-lora", {"norm_bound": 2.0}, "keeps factors on the clients"),
    ("fedavg", {"max_examples": -1}, "max_examples ≥ 1"),
    ("fedavg", {"trim": 0.5}, "0 ≤ trim < 0.5"),
    ("fedavg", {"norm_bound": float("nan")}, "a finite norm_bound"),  # was taken: every update cut to 0
])
def test_what_a_strategy_cannot_take_is_refused(inner, kw, message):
    with pytest.raises(ValueError, match=message):
        Robust(get_strategy(inner), **kw)


def test_a_robust_mean_is_refused_under_client_level_dp():
    dp = ClientLevelDP(get_strategy("fedavg"), clip=1.0, noise_multiplier=1.0, expected_clients=2)
    with pytest.raises(ValueError, match="client-level DP"):
        Robust(dp, mean="trimmed")
    assert Robust(dp, max_examples=5).describe()["dp"] == "client"  # weights compose with it


def test_norm_bounding_is_refused_under_client_level_dp():
    # Why: the bound is M × the round's median norm. Four clients of update norm 0.1 and five of
    # norm 1 with M = 1 and C = 1: one more client of norm 0.1 moves the median to 0.1 and shrinks
    # the five others, and the released sum by 2.25 (measured before the refusal), more than the
    # C its noise is set for
    from fedlora.errors import UserError
    from fedlora.job.flags import to_config
    from fedlora.rounds.build import make_strategy
    from fedlora.simulations.cli import build_parser
    dp = ClientLevelDP(get_strategy("ffa-lora"), clip=1.0, noise_multiplier=1.0, expected_clients=10)
    with pytest.raises(ValueError, match="norm bounding cannot run under client-level DP"):
        Robust(dp, norm_bound=1.0)
    args = ["--dp", "client", "--epsilon", "8", "--delta", "1e-3", "--num-clients", "10", "--norm-bound", "2"]
    with pytest.raises(UserError, match="norm bounding cannot run under client-level DP"):
        make_strategy(to_config(build_parser().parse_args(args), device="cpu"))


def test_a_row_reports_the_ledger_and_the_defences_together():
    dp = ClientLevelDP(get_strategy("ffa-lora"), clip=10.0, noise_multiplier=0.0, expected_clients=3)
    robust = Robust(dp, max_examples=10)
    robust.aggregate([ffa_upload([1, 0]), ffa_upload([0, 1]), ffa_upload([9, 9], n=10**9)], ffa_state())
    report = robust.round_report()
    assert report["dp"] == "client" and report["clip"] == 10.0 and report["capped_claims"] == 1
    assert report["norm_bounded"] == 0
