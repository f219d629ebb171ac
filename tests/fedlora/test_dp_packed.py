"""Packed Poisson batches in batched DP-SGD: layout, empty draws, batched = one client at a time."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedlora.kernels import Routing
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.privacy.accounting import Budget
from fedlora.privacy.dpsgd import (
    clipped_sums,
    dp_parameters,
    dp_passes,
    dp_train_clients,
    example_norms,
    noise_generator,
    pass_sums,
    per_client_sum,
    poisson_batches,
)
from fedlora.strategies import Probe
from fedlora.tasks import gather_rows
from fedlora.training.sketch import projected_clipped_sums
from fedlora.training.train import ClientSampler, TrainConfig

CPU = torch.device("cpu")
# three clients of different sizes: rows 0-11, 12-17 and 18-29 of the data
PARTS = [range(0, 12), range(12, 18), range(18, 30)]


def _data(n=30, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq, dtype=torch.long)
    for i in range(n):  # rows of different lengths: a pass pads to its longest row
        mask[i, 4 + i % 6:] = 0
    return {"input_ids": torch.randint(5, 1000, (n, seq), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 3, (n,), generator=g)}


def _model(base, slots, seed=1, dropout=0.0):
    """A model whose slots all differ (A, B ≠ 0 and the head), so a row routed to a wrong slot shows."""
    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[4] * slots, alpha=8.0, dropout=dropout))
    gen = torch.Generator().manual_seed(seed)
    for layer in fm.adapters.values():
        for k in range(slots):
            layer.set_slot(k, torch.randn(4, layer.lora_A.shape[-1], generator=gen) * 0.3,
                           torch.randn(layer.lora_B.shape[1], 4, generator=gen) * 0.3)
    head = fm.heads["classifier"]
    for k in range(slots):
        state = head.get_slot(k)
        head.set_slot(k, {key: v + 0.1 * torch.randn(v.shape, generator=gen) for key, v in state.items()})
    return fm


def _alone(base, fm, k):
    """A one-slot model holding slot k of ``fm`` (and its --lora-dropout)."""
    one = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[4], alpha=8.0, dropout=fm.config.dropout))
    for name, layer in one.adapters.items():
        layer.set_slot(0, *fm.adapters[name].get_slot(k))
    one.heads["classifier"].set_slot(0, fm.heads["classifier"].get_slot(k))
    return one


def _cfg(**kw):
    return TrainConfig(batch_size=4, lr=1e-2, max_grad_norm=0.5, dp_sample=True, dp_reproducible=True, **kw)


def _by_name(fm, pairs):
    names = {id(p): n for n, p in fm.named_parameters()}
    return {names[id(p)]: s for p, s in pairs}


def test_poisson_batches_are_packed_back_to_back_from_each_samplers_draws():
    # Prepare: 3 clients (10, 4 and 6 examples) at rates 0.5, 0 (draws nothing) and 1 (draws all)
    samplers = [ClientSampler(range(10), 7), ClientSampler(range(100, 104), 8),
                ClientSampler(range(200, 206), 9)]
    for s in samplers:
        s.start_round(3)
    # the draws by hand: one uniform per example from each client's (seed, round) generator
    keep0 = np.random.default_rng([7, 3]).random(10) < 0.5
    first = np.arange(10)[keep0].tolist()
    # Execute
    packed = poisson_batches(samplers, [0.5, 0.0, 1.0], reproducible=True)
    # Assert: client 0's draws, nothing from client 1, all of client 2, in that order
    n0 = len(first)
    assert 0 < n0 < 10
    assert packed.indices == first + list(range(200, 206))
    assert packed.ids.dtype == torch.long
    assert packed.ids.tolist() == [0] * n0 + [2] * 6
    assert packed.counts.tolist() == [n0, 0, 6]
    assert packed.offsets.tolist() == [0, n0, n0, n0 + 6]
    # the same rng calls as before packing: each generator advanced by exactly one draw per example
    for s, (seed, n) in zip(samplers, [(7, 10), (8, 4), (9, 6)], strict=True):
        rng = np.random.default_rng([seed, 3])
        rng.random(n)
        assert s.rng.random() == rng.random()


def test_secret_draws_leave_the_samplers_generators_alone():
    s = ClientSampler(range(10), 7)
    before = s.rng.bit_generator.state
    packed = poisson_batches([s], [0.5])
    assert s.rng.bit_generator.state == before and packed.ids.tolist() == [0] * len(packed.indices)


def test_per_client_sum_by_hand():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    ids = torch.tensor([0, 0, 2, 0])
    # client 0: rows 0, 1, 3; client 1: none; client 2: row 2
    expect = torch.tensor([[11.0, 14.0], [0.0, 0.0], [5.0, 6.0]])
    assert torch.equal(per_client_sum(values, ids, 3), expect)
    # trailing dimensions are kept; no rows at all gives zeros
    assert torch.equal(per_client_sum(values.view(4, 2, 1), ids, 3), expect.view(3, 2, 1))
    assert torch.equal(per_client_sum(torch.zeros(0, 2, 3), ids[:0], 2), torch.zeros(2, 2, 3))


def _pass_sums(fm, data, samplers, cfg, rates):
    """One step's draws, and ``(named clipped sums, named projected dense sums, loss sums)``
    over its passes."""
    packed = poisson_batches(samplers, rates, cfg.dp_reproducible)
    names = {id(p): n for n, p in fm.named_parameters()}
    identity = {n: Probe() for n in fm.adapters}

    def reduce(dpp):
        sums = {names[id(p)]: s for p, s in clipped_sums(fm, dpp, cfg.max_grad_norm).items()}
        dense = projected_clipped_sums(dpp, fm.adapters, identity, cfg.max_grad_norm)
        return {**sums, **{("dense", n): s for n, s in dense.items()}}

    got, losses = pass_sums(fm, data, packed, cfg, CPU, reduce)
    return packed, got, losses


def test_packed_pass_gives_each_client_the_clipped_sums_it_gets_alone(base):
    # Prepare: 3 clients with different slots; client 1 draws nothing (rate 0)
    data, fm, cfg = _data(), _model(base, 3), _cfg()
    rates = [0.5, 0.0, 0.6]
    # Execute: one packed step of the 3 clients, then each client alone in a one-slot model
    packed, sums, losses = _pass_sums(fm, data, [ClientSampler(p, 10 + k) for k, p in enumerate(PARTS)],
                                      cfg, rates)
    # Assert: the layout, the parameters in noise order, and client by client the same sums
    n = packed.counts.tolist()
    assert n[1] == 0 and n[0] > 0 and n[2] > 0
    assert packed.ids.tolist() == [0] * n[0] + [2] * n[2]
    dpp = next(dp_passes(fm, data, packed, cfg, CPU))
    assert list(clipped_sums(fm, dpp, 0.5)) == dp_parameters(fm)
    for k, part in enumerate(PARTS):
        one = _alone(base, fm, k)
        alone, own, own_losses = _pass_sums(one, data, [ClientSampler(part, 10 + k)], cfg, [rates[k]])
        assert alone.counts.tolist() == [n[k]]
        for key, s in own.items():
            torch.testing.assert_close(sums[key][k], s[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses[k], own_losses[0], rtol=1e-5, atol=1e-6)
    assert all(float(s[1].abs().max()) == 0 for s in sums.values())


def test_length_groups_give_the_one_pass_sums_over_fewer_padded_tokens(base):
    # Prepare: 3 clients at q = 1 (all 30 rows, lengths 4..9 in a width of 10): the grouping
    # splits them into passes of similar lengths; pad_to_longest=False is one pass of width 10
    data, fm, cfg = _data(), _model(base, 3), _cfg()
    samplers = [ClientSampler(p, 10 + k) for k, p in enumerate(PARTS)]
    packed = poisson_batches(samplers, [1.0] * 3, reproducible=True)
    # Execute
    passes = list(dp_passes(fm, data, packed, cfg, CPU))
    widths = [int(d.cap.x[fm.client_layers()[0]].shape[1]) for d in passes]
    grouped = pass_sums(fm, data, packed, cfg, CPU, lambda d: clipped_sums(fm, d, 0.5))
    flat = replace(cfg, pad_to_longest=False)
    single = list(dp_passes(fm, data, packed, flat, CPU))
    whole = pass_sums(fm, data, packed, flat, CPU, lambda d: clipped_sums(fm, d, 0.5))
    # Assert: several passes, each as wide as its longest row (< 10), every row in exactly one;
    # the same clipped sums and losses as the one pass
    assert len(passes) > 1 and len(single) == 1 and max(widths) <= 9 and min(widths) < 9
    assert sorted(i for d in passes for i in d.ids.tolist()) == sorted(packed.ids.tolist())
    for p, s in whole[0].items():
        torch.testing.assert_close(grouped[0][p], s, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grouped[1], whole[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_batched_dp_training_equals_one_client_at_a_time(base, dropout):
    # Prepare: 3 clients of 12, 6 and 12 examples (q = 1/3, 2/3, 1/3), 3 steps (--lora-dropout: masks
    # keyed to each example, whatever the packing and the length groups)
    data, cfg = _data(), _cfg(local_steps=3)
    start = _model(base, 3, dropout=dropout)

    def budgets(ks):
        return [Budget(sigma=0.8, sample_rate=min(1.0, 4 / len(PARTS[k])), delta=1e-3, epsilon=50.0)
                for k in ks]

    # Execute: all three in one packed pass per step, then each one alone
    fm = copy.deepcopy(start)
    loss = dp_train_clients(fm, data, [ClientSampler(p, 10 + k) for k, p in enumerate(PARTS)], cfg,
                            budgets(range(3)), rnd=2)
    for k, part in enumerate(PARTS):
        one = _alone(base, start, k)
        lone = dp_train_clients(one, data, [ClientSampler(part, 10 + k)], cfg, budgets([k]), rnd=2)
        # Assert: the client's own batches and noise give the same adapter and loss
        assert lone[0] == pytest.approx(loss[k], rel=1e-5)
        after = _alone(base, fm, k)
        for pa, po in zip(after.trainable_parameters(), one.trainable_parameters(), strict=True):
            torch.testing.assert_close(pa, po, rtol=1e-4, atol=1e-6)


def _draws_nothing(seed, rnd, n, q):
    return not (np.random.default_rng([seed, rnd]).random(n) < q).any()


def test_a_step_where_nobody_draws_an_example_releases_noise_only(base):
    # Prepare: 2 clients of 12 examples at q = 1/12 (batch 1), seeds whose round-1 draws are empty
    data, cfg = _data(), TrainConfig(local_steps=1, batch_size=1, lr=1e-2, max_grad_norm=0.5,
                                     dp_sample=True, dp_reproducible=True)
    seeds = [s for s in range(100) if _draws_nothing(s, 1, 12, 1 / 12)][:2]
    samplers = [ClientSampler(PARTS[0], seeds[0]), ClientSampler(PARTS[2], seeds[1])]
    fm = _model(base, 2)
    before = [p.detach().clone() for p in dp_parameters(fm)]
    budgets = [Budget(sigma=0.8, sample_rate=1 / 12, delta=1e-3, epsilon=50.0) for _ in range(2)]
    # Execute
    loss = dp_train_clients(fm, data, samplers, cfg, budgets, rnd=1)
    # Assert: no forward, so the gradient is σ C ξ_k / (q n) = 0.4 ξ_k, and AdamW's first step
    # is lr · g / (|g| + eps); the step counts in the budget, the loss is 0 (no rows)
    assert loss == [0.0, 0.0] and [b.steps for b in budgets] == [1, 1]
    for k, s in enumerate(samplers):
        gen = noise_generator(s.seed, 1, 0)
        for p, p0 in zip(dp_parameters(fm), before, strict=True):
            g = 0.8 * 0.5 * gen.normal(p.shape[1:]).float() / 1.0
            torch.testing.assert_close(p[k].detach(), p0[k] - 1e-2 * g / (g.abs() + 1e-8),
                                       rtol=1e-5, atol=1e-6)


def _albert():
    """A 2-layer ALBERT classifier: both layers are one shared block, so every adapted layer runs
    twice a forward."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(0)
    return AlbertForSequenceClassification(AlbertConfig(
        vocab_size=1000, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0, num_labels=3)).eval()


@pytest.mark.parametrize("model", ["bert", "albert"])
def test_example_norms_are_each_rows_own_gradient_norm_by_autograd(base, model):
    # Prepare: 3 slots that differ; slot 0's adapters and head train; 12 rows of lengths 4..9.
    # ALBERT's adapted layers run once per layer: their two calls' inputs and gradients both count
    # (keeping only one call's gave 0.55 × the norms: clipping bounded nothing)
    data, fm, cfg = _data(), _model(base if model == "bert" else _albert(), 3), _cfg()
    rows = list(range(12))
    # Execute
    got = example_norms(fm, data, rows, cfg, CPU)
    # Assert: the slow, obvious reference: each row alone through autograd, the norm of slot 0's
    # gradients of every trainable tensor (the grouping by length changes the order, not the set)
    expect = []
    for i in rows:
        fm.zero_grad(set_to_none=True)
        batch = gather_rows(data, [i], CPU)
        labels = batch.pop("labels")
        out = fm(routing=Routing.from_ids(torch.zeros(1, dtype=torch.long)), **batch)
        cfg.task.row_losses(out.logits, labels).sum().backward()
        sq = sum(float(p.grad[0].pow(2).sum()) for p in dp_parameters(fm) if p.grad is not None)
        expect.append(sq ** 0.5)
    assert got.shape == (12,)
    torch.testing.assert_close(got.sort().values, torch.tensor(sorted(expect)), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="at least one row"):
        example_norms(fm, data, [], cfg, CPU)
