"""Client-level DP (``--dp client``): clipping, noise, Fed-SB's initialisation, the ledger.

Shared LoRA setting of the hand-computed tests: one layer ``w`` with ``A`` 2×3 and
``B`` 3×2, a head tensor ``cls`` 1×2, two clients, ``m = 2``, ``C = 1``, ``σ = 0``.
Client weights are uniform (``1/m``) whatever ``num_examples`` says.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.strategies import ClientLevelDP, ClientUpload, GlobalState, get_strategy
from fedlora.strategies.fed_sb import FedSB, initialize_from_gradients

F64 = torch.float64


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def global_lora() -> GlobalState:
    A0 = t([[1, 0, 0], [0, 1, 0]])
    B0 = torch.zeros(3, 2, dtype=F64)
    return GlobalState(factors={"w": (A0, B0)}, scale=2.0, head={"cls": t([[0.5, -0.5]])})


def upload(state: GlobalState, dA, dB, dh, n: int = 1) -> ClientUpload:
    """A client that started from ``state`` and moved by ``(dA, dB, dh)``."""
    A0, B0 = state.factors["w"]
    return ClientUpload(num_examples=n, factors={"w": (A0 + t(dA), B0 + t(dB))}, scale=2.0,
                        head={"cls": state.head["cls"] + t(dh)})


def dp(name: str = "fedavg", sigma: float = 0.0, clip: float = 1.0, m: int = 2, **kw) -> ClientLevelDP:
    return ClientLevelDP(get_strategy(name), clip=clip, noise_multiplier=sigma, expected_clients=m, **kw)


ZERO_A, ZERO_B, ZERO_H = [[0, 0, 0], [0, 0, 0]], [[0, 0], [0, 0], [0, 0]], [[0, 0]]


def test_below_clip_without_noise_is_the_uniform_mean_by_hand():
    # Prepare: ‖Δ_1‖ = √(0.1² + 0.2²) ≈ 0.224, ‖Δ_2‖ = √(0.3² + 0.4²) = 0.5, both below C = 1
    g = global_lora()
    ups = [upload(g, [[0.1, 0, 0], [0, 0, 0]], [[0.2, 0], [0, 0], [0, 0]], [[0, 0]], n=1),
           upload(g, [[0, 0, 0], [0, 0, 0.3]], ZERO_B, [[0.4, 0]], n=3)]

    # Execute
    result = dp().aggregate(ups, g)

    # Assert: global + (Δ_1 + Δ_2) / 2, not the n-weighted mean (which would give 0.025 and 0.225)
    A, B = result.state.factors["w"]
    torch.testing.assert_close(A, t([[1.05, 0, 0], [0, 1, 0.15]]))
    torch.testing.assert_close(B, t([[0.1, 0], [0, 0], [0, 0]]))
    torch.testing.assert_close(result.state.head["cls"], t([[0.7, -0.5]]))
    assert result.state.scale == 2.0 and result.fold == {} and result.agg_error is None


def test_update_above_clip_is_scaled_to_norm_c_by_hand():
    # Prepare: ‖Δ_1‖ = √(3² + 4²) = 5 > C = 1, so Δ_1 becomes Δ_1 / 5 (ΔA 0.6, ΔB 0.8);
    # ‖Δ_2‖ = 0.5 stays
    g = global_lora()
    ups = [upload(g, [[3, 0, 0], [0, 0, 0]], [[0, 0], [0, 0], [0, 4]], ZERO_H),
           upload(g, [[0, 0.5, 0], [0, 0, 0]], ZERO_B, ZERO_H)]
    strategy = dp()

    # Execute
    result = strategy.aggregate(ups, g)
    alone = dp(m=1).aggregate(ups[:1], g)

    # Assert: mean ΔA = (0.6 + 0, 0 + 0.5) / 2 → A[0] = (1.3, 0.25, 0); ΔB = 0.8 / 2 = 0.4
    A, B = result.state.factors["w"]
    torch.testing.assert_close(A, t([[1.3, 0.25, 0], [0, 1, 0]]))
    torch.testing.assert_close(B, t([[0, 0], [0, 0], [0, 0.4]]))
    assert strategy.privacy_report()["clipped_fraction"] == 0.5
    # Assert: the clipped update alone (m = 1) has norm exactly C
    A1, B1 = alone.state.factors["w"]
    norm = torch.sqrt(((A1 - g.factors["w"][0]) ** 2).sum() + ((B1 - g.factors["w"][1]) ** 2).sum())
    assert float(norm) == pytest.approx(1.0, rel=1e-12)


def test_secure_mean_of_client_clipped_updates_gives_the_same_release_by_hand():
    # Prepare: under --secagg the clients clip (Δ_1 of norm 5 → ΔA 0.6, ΔB 0.8; Δ_2 = 0.5 stays)
    # and the server sees only their mean: ΔA = (0.3, 0.25, 0), ΔB[2, 1] = 0.4
    g = global_lora()
    mean = upload(g, [[0.3, 0.25, 0], [0, 0, 0]], [[0, 0], [0, 0], [0, 0.4]], ZERO_H, n=2)
    strategy = dp(m=4)

    # Execute
    result = strategy.aggregate_mean(mean, 2, g)

    # Assert: (Σ clip(Δ_k)) / m with m = 4: half the clients' mean; one release counted
    A, B = result.state.factors["w"]
    torch.testing.assert_close(A, t([[1.15, 0.125, 0], [0, 1, 0]]))
    torch.testing.assert_close(B, t([[0, 0], [0, 0], [0, 0.2]]))
    assert strategy.steps == 1 and result.agg_error is None
    with pytest.raises(ValueError, match="m = 4"):
        strategy.aggregate_mean(mean, 5, g)


def big_zero_round(n: int = 4, size: int = 200):
    A0 = torch.randn(size, size, dtype=torch.float32)
    g = GlobalState(factors={"w": (A0, torch.zeros(size, size))}, scale=1.0)
    ups = [ClientUpload(num_examples=1, factors={"w": (A0.clone(), torch.zeros(size, size))})
           for _ in range(n)]
    return g, ups


def test_noise_std_is_sigma_c_over_m():
    # Prepare: zero updates, σ = 2, C = 0.5, m = 4 → noise std on the mean σC/m = 0.25
    g, ups = big_zero_round()

    # Execute
    result = dp(sigma=2.0, clip=0.5, m=4).aggregate(ups, g)

    # Assert: 80 000 draws: the empirical std is within 2 % of 0.25, the mean near 0
    A, B = result.state.factors["w"]
    noise = torch.cat([(A - g.factors["w"][0]).flatten(), B.flatten()]).double()
    assert float(noise.std()) == pytest.approx(0.25, rel=0.02)
    assert abs(float(noise.mean())) < 0.01


def test_noise_depends_on_seed_and_release_index_only():
    # Prepare: an uninterrupted run of two releases, and a "resumed" wrapper at step 1
    g, ups = big_zero_round(n=2, size=8)
    run = dp(sigma=1.0, seed=7)
    first, second = run.aggregate(ups, g), run.aggregate(ups, g)
    resumed = dp(sigma=1.0, seed=7)
    resumed.steps = 1

    # Execute
    again = resumed.aggregate(ups, g)

    # Assert: the same noise at the same index, different noise at another index or seed
    torch.testing.assert_close(again.state.factors["w"][0], second.state.factors["w"][0])
    assert not torch.equal(first.state.factors["w"][0], second.state.factors["w"][0])
    other = dp(sigma=1.0, seed=8)
    other.steps = 1
    assert not torch.equal(other.aggregate(ups, g).state.factors["w"][0], second.state.factors["w"][0])


class RecordingFedSB(FedSB):
    """Fed-SB (dense initialisation) whose reduction records the uploads it receives."""

    def __init__(self) -> None:
        super().__init__(init="dense")
        self.seen: list[list[ClientUpload]] = []

    def init_reduce(self, phase, uploads, carry):
        self.seen.append(list(uploads))
        return super().init_reduce(phase, uploads, carry)


def test_fedsb_init_uses_the_clipped_uniform_mean_of_gradients():
    # Prepare: ‖G_1‖ = 5 → G_1 / 5 = [[0.6, 0.8], [0, 0]]; ‖G_2‖ = 0.5 stays; m = 2
    inner = RecordingFedSB()
    strategy = ClientLevelDP(inner, clip=1.0, noise_multiplier=0.0, expected_clients=2)
    ups = [ClientUpload(num_examples=10, grads={"w": t([[3, 4], [0, 0]])}),
           ClientUpload(num_examples=1, grads={"w": t([[0, 0], [0, -0.5]])})]

    # Execute
    state = initialize_from_gradients(strategy, ups, rank=1, scale=1.0)

    # Assert: the inner reduction saw one upload, the mean (G_1/5 + G_2) / 2
    (seen,) = inner.seen
    assert len(seen) == 1
    torch.testing.assert_close(seen[0].grads["w"], t([[0.3, 0.4], [0, -0.25]]))
    expected = initialize_from_gradients(get_strategy("fed-sb", init="dense"), seen, rank=1, scale=1.0)
    torch.testing.assert_close(state.cores["w"], expected.cores["w"])
    assert strategy.steps == 1 and strategy.privacy_report()["clipped_fraction"] == 0.5


def test_fedsb_sketched_init_is_two_releases_and_public_init_none():
    # Prepare: the default sketch has two phases, each one release; --init-data has none
    ups = [ClientUpload(num_examples=1, grads={"w": t([[3, 4], [0, 0]])}),
           ClientUpload(num_examples=1, grads={"w": t([[1, 0], [0, 1]])})]
    private = ClientLevelDP(FedSB(), clip=1.0, noise_multiplier=0.0, expected_clients=2)
    public = ClientLevelDP(FedSB(public=True), clip=1.0, noise_multiplier=0.0, expected_clients=2)

    # Execute
    initialize_from_gradients(private, ups, rank=1, scale=1.0)
    initialize_from_gradients(public, ups, rank=1, scale=1.0)

    # Assert
    assert (private.init_releases, private.steps) == (2, 2)
    assert (public.init_releases, public.steps) == (0, 0)
    private.resume(3)
    assert private.steps == 5


def test_fedsb_rounds_add_the_mean_core_update_and_keep_the_shared_factors():
    # Prepare: R_0 = I (2×2); ΔR_1 = diag(0.2, 0), ΔR_2 = [[0, 0.4], [0, 0]]; C = 1, m = 2
    shared = {"w": (torch.eye(2, dtype=F64), torch.eye(2, dtype=F64))}
    g = GlobalState(factors=shared, scale=0.5, cores={"w": torch.eye(2, dtype=F64)})
    ups = [ClientUpload(num_examples=1, cores={"w": torch.eye(2, dtype=F64) + t([[0.2, 0], [0, 0]])}),
           ClientUpload(num_examples=1, cores={"w": torch.eye(2, dtype=F64) + t([[0, 0.4], [0, 0]])})]

    # Execute
    result = dp("fed-sb").aggregate(ups, g)

    # Assert: R = I + [[0.1, 0.2], [0, 0]]; A, B and the scale untouched
    torch.testing.assert_close(result.state.cores["w"], t([[1.1, 0.2], [0, 1]]))
    assert result.state.factors is shared and result.state.scale == 0.5


@pytest.mark.parametrize("name", ["flora", "lora-fair"])
def test_refuses_strategies_that_are_not_sums(name):
    # Execute / Assert
    with pytest.raises(ValueError, match=f"sum of client updates.*{name}'s is not"):
        dp(name)


@pytest.mark.parametrize("clip, sigma", [(float("nan"), 1.0), (float("inf"), 1.0), (1.0, float("nan"))])
def test_refuses_a_clip_or_noise_that_is_not_finite(clip, sigma):  # nan was taken: no clip, no noise
    with pytest.raises(ValueError, match="a finite clip > 0"):
        ClientLevelDP(get_strategy("fedavg"), clip=clip, noise_multiplier=sigma, expected_clients=2)


def test_refuses_more_replies_than_the_expected_clients():
    # Prepare
    g = global_lora()
    ups = [upload(g, ZERO_A, ZERO_B, ZERO_H)] * 3

    # Execute / Assert
    with pytest.raises(ValueError, match="3 clients replied .* m = 2"):
        dp().aggregate(ups, g)


def client_cfg(**kw):
    from fedlora.job.schema import JobConfig

    base = dict(strategy="fedavg", num_clients=10, clients_per_round=4, rounds=5, dp="client",
                epsilon=4.0, delta=1e-5, update_clip=1.0)
    return JobConfig(**{**base, **kw})


def test_reported_epsilon_is_opacus_rdp_and_calibration_meets_the_target():
    from opacus.accountants import RDPAccountant

    from fedlora.privacy.accounting import spent
    from fedlora.rounds.build import make_strategy

    # Prepare: 4 of 10 clients per round (q = 0.4), 5 planned rounds, ε = 4
    strategy = make_strategy(client_cfg())
    g, ups = big_zero_round(n=4, size=4)

    # Execute: three rounds
    for _ in range(3):
        g = strategy.aggregate(ups, g).state
    report = strategy.privacy_report()

    # Assert: ε after 3 steps is Opacus' RDP ε for history [(σ, q, 3)]
    acc = RDPAccountant()
    acc.history = [(report["noise_multiplier"], 0.4, 3)]
    assert report["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert report["dp"] == "client" and report["clip"] == 1.0
    # Assert: the calibrated σ spends at most ε = 4 over the 5 planned rounds, and close to it
    final = spent(strategy.sigma, 0.4, 5, 1e-5)
    assert 4.0 - 0.05 <= final <= 4.0


def test_fixed_sigma_too_small_for_the_rounds_is_refused_before_training():
    from fedlora.errors import UserError
    from fedlora.privacy.accounting import spent
    from fedlora.rounds.build import make_strategy

    # Prepare: σ = 3 with every client every round (q = 1) affords only a few rounds of ε = 4
    cfg = client_cfg(clients_per_round=0, rounds=50, noise_multiplier=3.0)
    affordable = max(s for s in range(51) if spent(3.0, 1.0, s, 1e-5) <= 4.0 * (1 + 1e-3))
    assert 0 < affordable < 50

    # Execute / Assert
    with pytest.raises(UserError, match=f"affords {affordable} rounds: pass --rounds {affordable}"):
        make_strategy(cfg)


@pytest.mark.parametrize("kw, message", [
    (dict(strategy="flora"), "sum of client updates"),
    (dict(epsilon=0.0), "needs a budget"),
    (dict(delta=0.2), "not below 1/"),
])
def test_a_run_config_job_is_refused_at_its_boundary(kw, message):
    from fedlora.errors import UserError
    from fedlora.job.checks import check_job_args
    from fedlora.job.runconfig import from_run_config, to_run_config

    # Execute / Assert: a job that arrives as a Flower run config (the ServerApp's and ClientApp's
    # entry) is checked as its flags would be
    with pytest.raises(UserError, match=message):
        check_job_args(from_run_config(to_run_config(client_cfg(**kw))))


def test_resume_restores_the_step_count_and_the_noise(tmp_path, stub_coordinator):
    # Prepare: an uninterrupted 3-round job, and one checkpointed after round 2 (noise keyed
    # to the seed, so the resumed noise can be compared; by default it is secret)
    cfg = client_cfg(clients_per_round=0, num_clients=4, dp_reproducible=True)
    g, ups = big_zero_round(n=4, size=4)
    full, part = stub_coordinator(cfg), stub_coordinator(cfg)
    for coord in (full, part):
        coord.state = g
        coord.aggregate(ups)
        coord.aggregate(ups)
    full.aggregate(ups)
    part.save(tmp_path)

    # Execute: a fresh coordinator restores and runs round 3
    resumed = stub_coordinator(cfg)
    resumed.restore(tmp_path / "checkpoint.safetensors")
    resumed.aggregate(ups)

    # Assert: same release count, same ε, same noisy state as without the interruption
    assert resumed.strategy.steps == full.strategy.steps == 3
    assert resumed.strategy.privacy_report()["epsilon"] == full.strategy.privacy_report()["epsilon"]
    torch.testing.assert_close(resumed.state.factors["w"][0], full.state.factors["w"][0])


def test_coordinator_refuses_a_round_past_the_budget(stub_coordinator):
    from fedlora.errors import UserError

    # Prepare: a ledger already at its planned 5 rounds
    cfg = client_cfg()
    coord = stub_coordinator(cfg)
    coord.state, _ = big_zero_round(size=4)
    coord.round = coord.strategy.steps = 5

    # Execute / Assert
    with pytest.raises(UserError, match="ε=4 is spent after round 5"):
        coord.aggregate(big_zero_round(size=4)[1])


def _sim_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--num-clients", "3",
            "--rounds", "2", "--local-steps", "2", "--batch-size", "4", "--rank", "4",
            "--max-length", "16", "--quiet", "--dp", "client", "--epsilon", "8", "--delta", "1e-3",
            *extra]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fed-sb"])
def test_sim_end_to_end_reports_growing_epsilon_within_budget(tiny_bert_dir, tiny_csv, tmp_path,
                                                              strategy):
    from fedlora.simulations.cli import main

    # Execute
    out = tmp_path / "run"
    assert main(_sim_args(tiny_bert_dir, tiny_csv, out, "--strategy", strategy)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    # Assert: every round's row carries the ledger; ε grows and ends within 8
    eps = [r["epsilon"] for r in rows[1:]]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["dp"] == "client" and r["agg_error"] is None for r in rows[1:])
    assert 0 < eps[0] < eps[1] <= 8 * (1 + 1e-3)
    assert all(0.0 <= r["clipped_fraction"] <= 1.0 for r in rows[1:])


def test_sim_refuses_client_dp_for_flora_in_one_line(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    from fedlora.simulations.cli import main

    # Execute
    code = main(_sim_args(tiny_bert_dir, tiny_csv, tmp_path / "o", "--strategy", "flora"))

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sum" in err[0], err


def test_configured_noise_is_secret_unless_reproducible():
    # Prepare: the wrapper as fedlora-sim / fedlora-server build it
    from fedlora.job.schema import JobConfig
    from fedlora.rounds.build import make_strategy

    def draws(reproducible: bool):
        cfg = JobConfig(strategy="fedavg", dp="client", epsilon=8.0, delta=1e-3, num_clients=4,
                        dp_reproducible=reproducible)
        return make_strategy(cfg).noise(0).normal((4,))

    # Execute / Assert: OS entropy by default (two builds differ), the seed's with --dp-reproducible
    assert not torch.equal(draws(False), draws(False))
    assert torch.equal(draws(True), draws(True))


def test_the_rounds_clients_are_a_secret_draw_unless_reproducible(stub_coordinator):
    # Prepare: 10 clients, 4 a round; the job's own draw repeats from --seed (0 by default, and in
    # config.json), so it gave no amplification by sampling, which the accountant credits
    cfg, rounds = client_cfg(), range(1, 6)
    public = [cfg.sampled(r) for r in rounds]
    # Execute
    secret = [[stub_coordinator(cfg).sampled(r) for r in rounds] for _ in range(2)]
    seeded = stub_coordinator(client_cfg(dp_reproducible=True))
    # Assert: two runs draw apart (5 rounds of C(10, 4) = 210 sets: equal by chance with p = 210^-5),
    # neither the seed's; 4 distinct clients a round; --dp-reproducible and jobs without DP draw the seed's
    assert secret[0] != secret[1] and public not in secret
    assert all(len(set(c)) == 4 and set(c) <= set(range(10)) for draw in secret for c in draw)
    assert [seeded.sampled(r) for r in rounds] == public
    plain = client_cfg(dp="none")
    assert [stub_coordinator(plain).sampled(r) for r in rounds] == [plain.sampled(r) for r in rounds]


@pytest.mark.parametrize("name, rnd, pairs, want", [
    ("ffa-lora", 0, [(3.0, 2.0), (3.0, 6.0)], (3.0, 4.0)),      # B: 1 + ((2−1) + (6−1)) / 2 = 4
    ("rolora", 1, [(1.0, 1.0), (9.0, 1.0)], (5.0, 1.0)),        # round 2 trains A: 3 + (−2 + 6) / 2
    ("fedsa-lora", 0, [(1.0, None), (7.0, None)], (4.0, 1.0)),  # A: 3 + (−2 + 4) / 2 = 4; B stays
])
def test_client_level_dp_releases_only_the_uploaded_factor(name, rnd, pairs, want):
    # Prepare: global A = 3, B = 1; σ = 0 and a large clip, so the release is the plain mean
    # of the uploaded factor's updates (m = 2 clients)
    state = GlobalState(factors={"w": (torch.tensor([[3.0]]), torch.tensor([[1.0]]))}, scale=1.0, round=rnd)
    uploads = [ClientUpload(num_examples=n, scale=1.0,
                            factors={"w": (torch.tensor([[a]]), None if b is None else torch.tensor([[b]]))})
               for n, (a, b) in zip((1, 3), pairs, strict=True)]
    dp = ClientLevelDP(get_strategy(name), clip=100.0, noise_multiplier=0.0, expected_clients=2)
    # Execute
    agg = dp.aggregate(uploads, state)
    # Assert: uniform weights (n_k hidden), the frozen / kept factor untouched, one release
    A, B = agg.state.factors["w"]
    assert (float(A), float(B)) == pytest.approx(want)
    assert dp.steps == 1 and agg.agg_error is None
