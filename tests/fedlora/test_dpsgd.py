"""Sample-level DP-SGD: per-example gradients vs Opacus, clipping, noise, accounting, budgets."""

from __future__ import annotations

import copy

import pytest
import torch

from fedlora.errors import UserError
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.privacy.accounting import Budget, calibrate, check_delta, is_per_sample_safe, spent
from fedlora.privacy.dpsgd import (
    Capture,
    clip_factors,
    dp_parameters,
    grad_samples,
    noise_generator,
    noisy_mean,
)
from fedlora.tasks import get_task


def _batch(n=6, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[1, 6:] = 0  # padded tokens must not leak into the per-example gradients
    return {"input_ids": torch.randint(5, 1000, (n, seq), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 3, (n,), generator=g)}


def _our_grad_samples(base, batch, A_B):
    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[4], alpha=8.0))
    fm.reset_adapters(0)
    for name, layer in fm.adapters.items():
        if name in A_B:
            layer.set_slot(0, *A_B[name])
    inputs = dict(batch)
    labels = inputs.pop("labels")
    with Capture([*fm.adapters.values(), *fm.heads.values()]) as cap:
        get_task("classification").row_losses(fm(**inputs).logits, labels).sum().backward()
    ids = torch.zeros(labels.shape[0], dtype=torch.long)
    return fm, {id(p): g for p, g in grad_samples(fm, cap, ids)}


def test_per_example_gradients_equal_opacus_on_a_peft_model(base):
    # Prepare: random A and B (B ≠ 0 so both gradients are non-trivial), loaded into
    # fedlora's one-slot model and into a PEFT LoRA model wrapped by Opacus
    from opacus import GradSampleModule
    from peft import LoraConfig, get_peft_model

    batch = _batch()
    gen = torch.Generator().manual_seed(3)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0,
                                                           target_modules=["query", "value"],
                                                           task_type="SEQ_CLS"))
    A_B = {}
    for name, mod in peft.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            A = torch.randn(mod.lora_A["default"].weight.shape, generator=gen) * 0.3
            B = torch.randn(mod.lora_B["default"].weight.shape, generator=gen) * 0.3
            mod.lora_A["default"].weight.data.copy_(A)
            mod.lora_B["default"].weight.data.copy_(B)
            A_B[name.removeprefix("base_model.model.")] = (A, B)
    # Execute: Opacus' per-sample gradients of the summed loss, from Opacus' own nn.Linear grad
    # sampler (PEFT's lora_A / lora_B are nn.Linear); fedlora's from its hooks and kernels
    gsm = GradSampleModule(peft.train(), loss_reduction="sum")
    labels = batch["labels"]
    out = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.nn.functional.cross_entropy(out.logits, labels, reduction="sum").backward()
    fm, ours = _our_grad_samples(base, batch, A_B)
    # Assert: every adapted layer's A and B, and the head, example by example
    assert len(A_B) == 4
    for name, layer in fm.adapters.items():
        mod = peft.get_submodule(f"base_model.model.{name}")
        torch.testing.assert_close(ours[id(layer.lora_A)][:, :4], mod.lora_A["default"].weight.grad_sample,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours[id(layer.lora_B)][:, :, :4],
                                   mod.lora_B["default"].weight.grad_sample, rtol=1e-4, atol=1e-6)
    head = fm.heads["classifier"]
    opacus_head = peft.get_submodule("base_model.model.classifier.modules_to_save.default")
    torch.testing.assert_close(ours[id(head.weight)][:], opacus_head.weight.grad_sample, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[id(head.bias)], opacus_head.bias.grad_sample, rtol=1e-4, atol=1e-6)


def test_clipping_bounds_every_per_example_norm(base):
    # Prepare: per-example gradients of a real batch, a clipping norm below most of them
    batch = _batch(seed=1)
    fm, ours = _our_grad_samples(base, batch, {})
    sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in ours.values())
    C = float(sq.sqrt().median())
    w = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])  # row 3 is padding
    # Execute
    c = clip_factors(sq, w, C)
    # Assert: clipped norms ≤ C, small ones untouched, padding gets zero weight
    clipped = c * sq.sqrt()
    assert float(clipped.max()) <= C * (1 + 1e-5)
    small = (sq.sqrt() < C) & (w > 0)
    torch.testing.assert_close(c[small], torch.ones(int(small.sum())))
    assert c[3] == 0 and (sq.sqrt() > C).any()


def test_clip_factors_by_hand():
    # norms 3, 0.5, 4 with C = 1: factors 1/3, 1, 1/4 (up to the 1e-6 guard)
    c = clip_factors(torch.tensor([9.0, 0.25, 16.0]), torch.ones(3), 1.0)
    torch.testing.assert_close(c, torch.tensor([1 / 3, 1.0, 0.25]), rtol=1e-5, atol=1e-6)


def test_noise_standard_deviation_matches_the_calibration():
    # Prepare: zero clipped sums for 2 clients with σ 1.3 and 0.4, C = 0.7, E = 4 and 8
    summed = torch.zeros(2, 300, 300)
    gens = [noise_generator(11, 1, 0), noise_generator(12, 1, 0)]
    # Execute
    noisy = noisy_mean(summed, torch.tensor([1.3, 0.4]), 0.7, torch.tensor([4.0, 8.0]), gens)
    # Assert: std σ_k C / E_k within 2% (90,000 draws each), mean ≈ 0
    assert float(noisy[0].std()) == pytest.approx(1.3 * 0.7 / 4, rel=0.02)
    assert float(noisy[1].std()) == pytest.approx(0.4 * 0.7 / 8, rel=0.02)
    assert abs(float(noisy[0].mean())) < 0.01


def test_reproducible_noise_is_keyed_by_client_round_and_step_and_default_noise_is_secret():
    a = noise_generator(5, 2, 1).normal((3,))
    assert torch.equal(a, noise_generator(5, 2, 1).normal((3,)))
    assert not torch.equal(a, noise_generator(5, 2, 2).normal((3,)))
    # default: OS entropy, so the same key gives different noise (nobody can regenerate it)
    assert not torch.equal(noise_generator(5, 2, 1, reproducible=False).normal((3,)),
                           noise_generator(5, 2, 1, reproducible=False).normal((3,)))


def test_epsilon_matches_opacus_accountant_and_calibration_meets_the_target():
    # Prepare: Opacus' own RDP accountant stepped 37 times at q = 0.05, σ = 1.1
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(37):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    # Execute
    budget = Budget(sigma=1.1, sample_rate=0.05, delta=1e-5, epsilon=100.0, steps=37)
    sigma = calibrate(3.0, 1e-5, 0.05, 200)
    # Assert
    assert budget.spent == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert 2.95 <= spent(sigma, 0.05, 200, 1e-5) <= 3.0


def test_spent_is_opacus_rdp_epsilon_to_the_bit_from_one_step_s_rdp():
    # Prepare: Opacus' accountant with the whole history in one entry, at several (σ, q, steps)
    from opacus.accountants import RDPAccountant

    for sigma, q, steps in [(1.1, 0.05, 37), (0.7, 0.25, 1), (2.3, 1.0, 400), (1.0, 1 / 12, 6)]:
        acc = RDPAccountant()
        acc.history = [(sigma, q, steps)]
        # Execute / Assert: the cached one-step RDP times steps gives the same float
        assert spent(sigma, q, steps, 1e-5) == acc.get_epsilon(delta=1e-5)


def test_a_budget_checked_every_step_computes_one_step_s_rdp_once(monkeypatch):
    # Prepare: count Opacus' RDP computations (about 0.2 s each: once per step and client, they
    # were most of a DP step's time on a GPU)
    import opacus.accountants.analysis.rdp as rdp

    from fedlora.privacy import accounting

    calls = []
    real = rdp.compute_rdp
    monkeypatch.setattr(rdp, "compute_rdp", lambda **kw: calls.append(kw) or real(**kw))
    accounting._step_rdp.cache_clear()
    budgets = [Budget(sigma=0.9, sample_rate=0.1, delta=1e-5, epsilon=50.0) for _ in range(3)]
    # Execute: 40 checked steps of three clients with the same (σ, q)
    for _ in range(40):
        for b in budgets:
            assert b.can_step()
            b.step()
    # Assert
    assert len(calls) == 1 and calls[0]["steps"] == 1


def test_client_budgets_calibrate_a_sigma_when_a_client_is_first_read(monkeypatch):
    # Prepare: 500 clients of 500 sizes (a Dirichlet partition): as many sampling rates, each σ a
    # search of seconds; count the calibrations (stubbed: σ = 1 + q)
    from fedlora.job.schema import JobConfig
    from fedlora.privacy import accounting

    asked = []
    monkeypatch.setattr(accounting, "calibrate", lambda e, d, q, steps: asked.append((q, steps)) or 1.0 + q)
    # an ε of this test alone: no σ of it is cached in this process yet
    cfg = JobConfig(dp="sample", batch_size=4, epsilon=8.125, delta=1e-5, rounds=3, local_steps=2)
    # Execute: set up, then read two clients (one of them twice) and a third of the second's size
    budgets = accounting.sample_budgets(cfg, [8 + k for k in range(499)] + [9], init_releases=0)
    set_up = list(asked)
    got = [budgets[0], budgets[1], budgets[1], budgets[499]]
    # Assert: nothing calibrated at set-up; then one σ per rate read, over the 6 planned steps
    assert set_up == [] and len(budgets) == 500
    assert asked == [(0.5, 6), (4 / 9, 6)]
    assert [(b.sigma, b.sample_rate) for b in got] == [(1.5, 0.5)] + [(1 + 4 / 9, 4 / 9)] * 3
    assert got[1] is got[2] and sorted(budgets.made) == [0, 1, 499]
    with pytest.raises(IndexError):
        budgets[500]


def test_client_budgets_refuse_an_initialisation_the_smallest_client_cannot_afford():
    # Prepare: σ = 0.3 given, 4 batches of initialisation, the smallest client (4 examples) at q = 1
    from fedlora.job.schema import JobConfig
    from fedlora.privacy.accounting import sample_budgets

    cfg = JobConfig(dp="sample", batch_size=4, epsilon=1.0, delta=1e-5, noise_multiplier=0.3,
                    init_batches=4)
    # Execute / Assert
    with pytest.raises(UserError, match="initialisation .4 batches of the clients' data. alone spends"):
        sample_budgets(cfg, [400, 4, 200], init_releases=1)


def test_budget_refuses_the_step_that_would_overspend():
    # Prepare: σ = 1, q = 1/12, δ = 1e-3: ε after 5 steps is 1.488, after 6 is 1.561
    b = Budget(sigma=1.0, sample_rate=1 / 12, delta=1e-3, epsilon=1.5)
    # Execute
    taken = 0
    while b.can_step():
        b.step()
        taken += 1
    # Assert
    assert taken == 5 and b.spent <= 1.5


def test_refusals_name_the_fix():
    with pytest.raises(UserError, match="smaller than"):
        check_delta(0.02, 60, "the smallest client's examples")
    bn = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    assert "mixes the examples" in is_per_sample_safe(bn)
    assert is_per_sample_safe(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))) is None


def test_a_frozen_head_has_no_per_example_gradients(base):
    # Prepare: --head frozen: the head's tensors do not train
    batch = _batch()
    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[4], alpha=8.0))
    fm.reset_adapters(0)
    fm.freeze_heads()
    inputs = dict(batch)
    labels = inputs.pop("labels")
    # Execute
    with Capture([*fm.adapters.values(), *fm.heads.values()]) as cap:
        get_task("classification").row_losses(fm(**inputs).logits, labels).sum().backward()
    got = grad_samples(fm, cap, torch.zeros(labels.shape[0], dtype=torch.long))
    # Assert: only the adapters' factors, in the order noise is drawn (dp_parameters)
    heads = {id(p) for h in fm.heads.values() for p in h.parameters()}
    assert got and not any(id(p) in heads for p, _ in got)
    assert [id(p) for p, _ in got] == [id(p) for p in dp_parameters(fm)]
