"""Fed-SB's initialisation on clients: projected gradients against the frozen weights' autograd
gradient, the sketched initialisation against a dense SVD, and its DP release."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.privacy.accounting import Budget
from fedlora.strategies import ClientUpload, Probe
from fedlora.strategies.fed_sb import FedSB
from fedlora.tasks import get_task
from fedlora.training.sketch import client_sketches
from fedlora.training.train import ClientSampler, TrainConfig

SIZES = (5, 9)  # examples of the two clients


class NoiselessBudget(Budget):
    """σ = 0 (no accountant could price it): a ledger that only counts steps."""

    def __init__(self) -> None:
        super().__init__(sigma=0.0, sample_rate=1.0, delta=1e-5, epsilon=1.0)

    def can_step(self) -> bool:
        return True


def _data(n=14, seq=8, seed=0):  # 14 = sum(SIZES)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {"input_ids": torch.randint(5, 1000, (n, seq), generator=g) * mask, "attention_mask": mask,
            "labels": torch.randint(0, 3, (n,), generator=g)}


def _model(base, slots=2):
    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[2] * slots, alpha=4.0,
                                                           plan=FedSB.adapter_plan))
    return fm.eval()


def _samplers():
    start = [0, SIZES[0]]
    return [ClientSampler(range(s, s + n), seed=11 + k)
            for k, (s, n) in enumerate(zip(start, SIZES, strict=True))]


def _reference_gradients(base, data, samplers, cfg, steps):
    """Slow, obvious reference: client k alone, its frozen weights made trainable, autograd of
    its mean loss over the same batches: layer -> G_k (d_out × d_in), averaged over steps."""
    out = []
    for s in samplers:
        s.start_round(0)
        fm = _model(base, slots=1)
        for layer in fm.adapters.values():
            layer.base.weight.requires_grad_(True)
        for _ in range(steps):
            rows = s.take(cfg.batch_size)
            batch = {k: v[rows] for k, v in data.items()}
            labels = batch.pop("labels")
            loss = cfg.task.loss_sums(fm(**batch).logits, labels).mean() / steps
            loss.backward()
        out.append({name: layer.base.weight.grad.clone() for name, layer in fm.adapters.items()})
    return out


def test_client_answers_are_the_projected_autograd_gradient(base):
    # Prepare: two clients in one pass; probes: dense, a right sketch Ω, a left projection Q
    data, cfg = _data(), TrainConfig(task=get_task("classification"), batch_size=4)
    ref = _reference_gradients(base, data, _samplers(), cfg, steps=2)
    fm = _model(base)
    gen = torch.Generator().manual_seed(1)
    layers = list(fm.adapters)
    dense = {n: Probe() for n in layers}
    shape = {n: fm.adapters[n].base.weight.shape for n in layers}
    right = {n: Probe(right=torch.randn(shape[n][1], 3, generator=gen)) for n in layers}
    left = {n: Probe(left=torch.randn(shape[n][0], 3, generator=gen)) for n in layers}

    # Execute
    got = {kind: client_sketches(fm, data, _samplers(), cfg, 2, probes)
           for kind, probes in (("dense", dense), ("right", right), ("left", left))}

    # Assert: G_k, G_k Ω and Qᵀ G_k for both clients, every layer
    for k in range(2):
        for n in layers:
            G = ref[k][n]
            torch.testing.assert_close(got["dense"][n][k], G, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got["right"][n][k], G @ right[n].right, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got["left"][n][k], left[n].left.T @ G, rtol=1e-4, atol=1e-6)


def test_sketched_initialisation_equals_a_dense_svd_of_the_same_sum(base):
    # Prepare: w = d_in ≥ rank(Ḡ): the sketch holds Ḡ's whole range
    data, cfg = _data(), TrainConfig(task=get_task("classification"), batch_size=4)
    fm = _model(base)
    d_out, d_in = next(iter(fm.adapters.values())).base.weight.shape
    strategy = FedSB(sketch_width=min(d_out, d_in), seed=3)
    shapes = {n: tuple(layer.base.weight.shape) for n, layer in fm.adapters.items()}
    dense = client_sketches(fm, data, _samplers(), cfg, 2, {n: Probe() for n in shapes})
    p = [n / sum(SIZES) for n in SIZES]

    # Execute: the two phases through the clients, then the SVD of the small sum
    carry: dict = {}
    for phase in range(strategy.init_phases):
        probes = strategy.init_probes(phase, shapes, 2, carry)
        got = client_sketches(fm, data, _samplers(), cfg, 2, probes)
        uploads = [ClientUpload(num_examples=n, grads={k: g[i] for k, g in got.items()})
                   for i, n in enumerate(SIZES)]
        carry = strategy.init_reduce(phase, uploads, carry)
    state = strategy.initialize(carry, rank=2, scale=2.0, shapes=shapes)

    # Assert: B's columns and A's rows are Ḡ's top singular vectors up to sign; R_0 ∝ −Σ_r
    for n in shapes:
        G = (p[0] * dense[n][0] + p[1] * dense[n][1]).double()
        U, S, Vh = torch.linalg.svd(G)
        A, B = state.factors[n]
        torch.testing.assert_close((B.double().T @ U[:, :2]).abs(), torch.eye(2, dtype=torch.float64),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close((A.double() @ Vh[:2].T).abs(), torch.eye(2, dtype=torch.float64),
                                   atol=1e-4, rtol=0)
        c = strategy.init_lr * (d_out * d_in) ** 0.5 / torch.linalg.norm(G)
        torch.testing.assert_close(state.cores[n].double(), -c * torch.diag(S[:2]) / 2.0, rtol=1e-4, atol=0)


def test_private_sketch_without_noise_or_clipping_is_the_plain_mean(base):
    # Prepare: every example drawn (q = 1), σ = 0, a clip no example reaches: DP sums of the
    # per-example answers over n_k equal the plain client's mean-loss answer
    data = _data()
    cfg = TrainConfig(task=get_task("classification"), batch_size=max(SIZES))
    fm = _model(base)
    gen = torch.Generator().manual_seed(2)
    probes = {n: Probe(right=torch.randn(layer.base.weight.shape[1], 3, generator=gen))
              for n, layer in fm.adapters.items()}
    plain = client_sketches(fm, data, [ClientSampler(range(0, 5), 1)], replace(cfg, batch_size=5), 1,
                            probes)
    budgets = [NoiselessBudget()]

    # Execute
    private = client_sketches(fm, data, [ClientSampler(range(0, 5), 1)],
                              replace(cfg, batch_size=5, dp_sample=True, max_grad_norm=1e6), 1, probes,
                              budgets)

    # Assert: equal answers, and one step of the budget spent
    for n in probes:
        torch.testing.assert_close(private[n], plain[n], rtol=1e-4, atol=1e-7)
    assert budgets[0].steps == 1


def test_private_sketch_clips_each_example_jointly_over_layers(base):
    # Prepare: a tiny clip C: each example's answers (all layers together) are scaled to norm C,
    # so with σ = 0 and q = 1 the released mean has norm ≤ C
    data, fm = _data(), _model(base)
    cfg = TrainConfig(task=get_task("classification"), batch_size=5, dp_sample=True, max_grad_norm=1e-3)
    gen = torch.Generator().manual_seed(2)
    probes = {n: Probe(right=torch.randn(layer.base.weight.shape[1], 3, generator=gen))
              for n, layer in fm.adapters.items()}
    budgets = [NoiselessBudget()]

    # Execute
    got = client_sketches(fm, data, [ClientSampler(range(0, 5), 1)], cfg, 1, probes, budgets)

    # Assert
    norm = torch.sqrt(sum(g[0].pow(2).sum() for g in got.values()))
    assert 0 < float(norm) <= 1e-3 * (1 + 1e-4)
