"""DP-SGD of a lone client through Opacus (``--dp-backend opacus``, a deployed client's default)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fedlora.job.schema import JobConfig
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.privacy.accounting import Budget
from fedlora.strategies.fed_sb import FedSB
from fedlora.strategies.ffa_lora import FFALoRA
from fedlora.strategies.plan import LORA
from fedlora.training.train import ClientSampler, TrainConfig, local_training


@pytest.fixture(scope="module")
def base(tiny_bert_dir):
    return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)


def _data(n=24, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::4, 7:] = 0
    return {"input_ids": torch.randint(5, 1000, (n, seq), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 3, (n,), generator=g)}


def _model(base, mode, slots=1, dropout=0.0):
    plan = {"lora-sb": FedSB.adapter_plan, "ffa-lora": FFALoRA.adapter_plan}.get(mode, LORA)
    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[4] * slots, alpha=8.0, plan=plan,
                                                           dropout=dropout))
    if mode != "lora-sb":
        fm.reset_adapters(0)
    gen = torch.Generator().manual_seed(1)
    for layer in fm.adapters.values():
        if mode == "lora-sb":
            layer.set_shared(torch.randn(layer.sb_A.shape, generator=gen) * 0.3,
                             torch.randn(layer.sb_B.shape, generator=gen) * 0.3)
            layer.set_core(0, torch.randn(4, 4, generator=gen) * 0.1)
        else:  # B ≠ 0, so both A's and B's gradients are non-trivial
            layer.set_slot(0, torch.randn(4, layer.lora_A.shape[-1], generator=gen) * 0.3,
                           torch.randn(layer.lora_B.shape[1], 4, generator=gen) * 0.3)
    return fm


def _cfg(backend, steps=4):
    return TrainConfig(local_steps=steps, batch_size=6, lr=1e-2, max_grad_norm=0.5, dp_sample=True,
                       dp_reproducible=True, dp_backend=backend)


@pytest.mark.parametrize("mode,dropout", [("lora", 0.0), ("lora-sb", 0.0), ("ffa-lora", 0.0), ("lora", 0.2),
                                          ("lora-sb", 0.2)])
def test_opacus_client_equals_fedlora_batched_dp(base, mode, dropout):
    # Prepare: the same one-slot model, data (24 rows, q = 6/24) and seed-keyed draws twice
    # (--lora-dropout: Opacus' grad sampler reads the adapter's dropped-out input)
    data = _data()
    runs = {}
    for backend in ("fedlora", "opacus"):
        fm = _model(base, mode, dropout=dropout)
        budget = Budget(sigma=0.8, sample_rate=0.25, delta=1e-3, epsilon=50.0)
        # Execute: 4 DP-SGD steps through fedlora's kernels, then through Opacus' GradSampleModule
        # and DPOptimizer (with fedlora's grad samplers registered for its layers)
        loss = local_training(fm, data, [ClientSampler(range(24), 7)], _cfg(backend), 1, [budget])
        runs[backend] = (fm, loss, budget.steps)
    # Assert: the same Poisson batches, clipping, noise and AdamW: the same adapter
    (fa, la, sa), (fo, lo, so) = runs["fedlora"], runs["opacus"]
    assert sa == so == 4 and lo[0] == pytest.approx(la[0], rel=1e-5)
    moved = 0.0
    for pa, po, p0 in zip(fa.trainable_parameters(), fo.trainable_parameters(),
                          _model(base, mode, dropout=dropout).trainable_parameters(), strict=True):
        torch.testing.assert_close(po, pa, rtol=1e-4, atol=1e-6)
        moved = max(moved, float((pa - p0).detach().abs().max()))
    assert moved > 1e-3  # the steps did change the adapter
    if dropout:  # ... and the dropout changed what they learnt
        plain = _model(base, mode)
        local_training(plain, data, [ClientSampler(range(24), 7)], _cfg("fedlora"), 1,
                       [Budget(sigma=0.8, sample_rate=0.25, delta=1e-3, epsilon=50.0)])
        assert any(not torch.allclose(p, q, atol=1e-5) for p, q in
                   zip(plain.trainable_parameters(), fa.trainable_parameters(), strict=True))
    if mode == "ffa-lora":  # FFA-LoRA: only B has per-example gradients and moves; A stays put
        assert [p.shape[1:] for p in fa.trainable_parameters() if p.dim() == 3][:1] == [(32, 4)]
        start = _model(base, mode)
        for name, layer in fa.adapters.items():
            torch.testing.assert_close(layer.lora_A, start.adapters[name].lora_A, rtol=0, atol=0)


def test_opacus_client_stops_at_its_budget_and_leaves_no_hooks(base):
    # Prepare: σ 1, q 1/4, δ 1e-3 and a budget that affords exactly 2 steps
    b2 = Budget(sigma=1.0, sample_rate=0.25, delta=1e-3, epsilon=0.0)
    b2.epsilon = b2.epsilon_after(2)
    fm = _model(base, "lora")
    # Execute: ask for 5 steps
    local_training(fm, _data(), [ClientSampler(range(24), 7)], _cfg("opacus", steps=5), 1, [b2])
    # Assert: 2 steps taken; Opacus' hooks and per-example buffers are gone afterwards
    assert b2.steps == 2
    assert all(not m._forward_hooks and not m._backward_hooks for m in fm.modules())
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in fm.parameters())
    assert not any(m.training for m in fm.model.modules())


def test_opacus_draws_secret_noise_by_default(base):
    # Prepare / Execute: two runs from the same seed without --dp-reproducible
    outs = []
    for _ in range(2):
        fm = _model(base, "lora")
        cfg = _cfg("opacus", steps=1)
        cfg.dp_reproducible = False
        local_training(fm, _data(), [ClientSampler(range(24), 7)], cfg,
                       1, [Budget(sigma=1.0, sample_rate=0.25, delta=1e-3, epsilon=50.0)])
        outs.append(torch.cat([p.detach().flatten() for p in fm.trainable_parameters()]))
    # Assert: nobody who knows the seed can regenerate the noise or the batches
    assert not torch.allclose(outs[0], outs[1])


def test_opacus_backend_refuses_a_batched_pass(base):
    with pytest.raises(ValueError, match="one client per pass"):
        local_training(_model(base, "lora", slots=2), _data(), [ClientSampler(range(12), 0),
                       ClientSampler(range(12, 24), 1)], _cfg("opacus"), 1,
                       [Budget(1.0, 0.5, 1e-3, 50.0), Budget(1.0, 0.5, 1e-3, 50.0)])


def test_auto_backend_is_opacus_for_a_deployed_client_and_fedlora_in_the_simulator():
    from fedlora.simulations.engine import pass_size

    cfg = JobConfig(dp="sample", epsilon=8.0, num_clients=10, batch_size=2, max_length=16)
    assert TrainConfig.from_job(cfg, lone=True).dp_backend == "opacus"
    assert TrainConfig.from_job(cfg).dp_backend == "fedlora"
    assert pass_size(cfg, 10) == 10  # 32 tokens per client: all ten fill less than a CPU pass
    # an explicit --dp-backend opacus in the simulator trains one client per pass
    cfg.dp_backend = "opacus"
    assert TrainConfig.from_job(cfg).dp_backend == "opacus" and pass_size(cfg, 10) == 1
