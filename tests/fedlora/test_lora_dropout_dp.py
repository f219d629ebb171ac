"""--lora-dropout under DP-SGD: each drawn example's per-example gradient, as fedlora's kernels and
Opacus' grad samplers compute it in a batched pass, is autograd of that example's own loss run
alone through its own dropout mask (LoRA, LoRA-SB; DPO pairs: ``test_dpo``), and its mask does not
depend on which other examples were drawn."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from transformers import AutoModelForSequenceClassification

from fedlora.kernels import row_keys, subrow_keys
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.privacy import opacus_dp  # noqa: F401  (registers fedlora's grad samplers with Opacus)
from fedlora.privacy.dpsgd import dp_passes, grad_samples, poisson_batches
from fedlora.strategies.fed_sb import FedSB
from fedlora.strategies.plan import LORA
from fedlora.tasks import gather_rows, get_task, row_groups
from fedlora.training.train import ClientSampler, TrainConfig

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base(tiny_bert_dir):
    return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)


def _data(n=12, seq=10, seed=4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq, dtype=torch.long)
    for i in range(n):  # rows of different lengths: the pass runs as micro-batches
        mask[i, 3 + (5 * i) % 8:] = 0
    return {"input_ids": torch.randint(5, 1000, (n, seq), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 3, (n,), generator=g)}


def _bert(base, mode, p=0.3):
    """A one-slot model with every trained tensor's gradient non-trivial (B ≠ 0; LoRA-SB: R ≠ 0)."""
    plan = FedSB.adapter_plan if mode == "lora-sb" else LORA
    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[4], alpha=8.0, plan=plan, dropout=p))
    gen = torch.Generator().manual_seed(1)
    for layer in fm.adapters.values():
        if mode == "lora-sb":
            layer.set_shared(torch.randn(layer.sb_A.shape, generator=gen) * 0.3,
                             torch.randn(layer.sb_B.shape, generator=gen) * 0.3)
            layer.set_core(0, torch.randn(4, 4, generator=gen) * 0.1)
        else:
            layer.set_slot(0, torch.randn(4, layer.lora_A.shape[-1], generator=gen) * 0.3,
                           torch.randn(layer.lora_B.shape[1], 4, generator=gen) * 0.3)
    return fm


def _alone(fm, data, row: int, key, task) -> list[torch.Tensor]:
    """Autograd of example ``row``'s own loss, run alone with its own dropout ``key``: each trained
    tensor's gradient (slot 0)."""
    fm.zero_grad(set_to_none=True)
    inputs, labels = task.model_inputs(gather_rows(data, [row], CPU, True))
    positions = task.logit_positions(labels)
    out = fm(positions=positions, dropout_keys=subrow_keys(key.view(1), task.rows_per_example), **inputs)
    task.row_losses(out.logits, labels, positions).sum().backward()
    return [p.grad[0].clone() for p in fm.trainable_parameters()]


def fedlora_per_example(fm, data, n, task, q=0.7):
    """fedlora's DP passes over one step's Poisson draw (round 2, step 1) of a client of ``n``
    examples: ``(dataset row -> its per-example gradients, row -> its dropout key)``."""
    sampler = ClientSampler(range(n), seed=9)
    sampler.start_round(2)
    packed = poisson_batches([sampler], [q], reproducible=True, step=1)
    cfg = TrainConfig(task=task, batch_size=n, dp_sample=True, max_grad_norm=1.0)
    rows = torch.as_tensor(packed.indices, dtype=torch.long)
    groups = row_groups(data, rows, cfg.pad_to_longest) or [torch.arange(len(rows))]
    fm.train()
    ours = {}
    for dpp, group in zip(dp_passes(fm, data, packed, cfg, CPU), groups, strict=True):
        gs = grad_samples(fm, dpp.cap, dpp.ids)
        for j, row in enumerate(rows[group].tolist()):
            ours[row] = [g[j] for _, g in gs]
    return ours, dict(zip(packed.indices, packed.keys, strict=True))


def assert_alone(fm, data, ours, keys, task):
    """Every row's per-example gradients in ``ours`` are :func:`_alone`'s."""
    assert len(ours) > 1
    for row, got in ours.items():
        for g, want in zip(got, _alone(fm, data, row, keys[row], task), strict=True):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["lora", "lora-sb"])
def test_fedlora_per_example_gradients_are_each_example_alone_through_its_mask(base, mode):
    # Prepare: P = 0.3, a client of 12 examples of different lengths, q = 0.7
    fm, data, task = _bert(base, mode), _data(), get_task("classification")
    # Execute: one step's passes (micro-batches of similar lengths)
    ours, keys = fedlora_per_example(fm, data, 12, task)
    # Assert: each drawn example's per-example gradient is autograd of its loss alone, its own mask
    assert len(ours) < 12  # not every example was drawn
    assert_alone(fm, data, ours, keys, task)
    # ... and its mask is its own: the same key whichever others another draw takes (q = 1: all)
    _, every = fedlora_per_example(fm, data, 12, task, q=1.0)
    assert all(int(every[row]) == int(k) for row, k in keys.items())


@pytest.mark.parametrize("mode", ["lora", "lora-sb"])
def test_opacus_grad_samples_are_each_example_alone_through_its_mask(base, mode):
    # Prepare: P = 0.3, 6 examples with a step's keys, Opacus' GradSampleModule over the model
    fm, data, task = _bert(base, mode), _data(n=6), get_task("classification")
    sampler = ClientSampler(range(6), seed=9)
    sampler.start_round(2)
    packed = poisson_batches([sampler], [1.0], reproducible=True, step=1)
    fm.train()
    for layer in fm.client_layers():
        layer.training = True
    gsm = GradSampleModule(fm, batch_first=True, loss_reduction="sum", strict=False)
    # Execute: one batched forward and backward of the summed loss
    inputs, labels = task.model_inputs(gather_rows(data, packed.indices, CPU, False))
    task.row_losses(gsm(dropout_keys=packed.keys, **inputs).logits, labels).sum().backward()
    ours = {row: [p.grad_sample[j, 0].clone() for p in fm.trainable_parameters()]
            for j, row in enumerate(packed.indices)}
    gsm.remove_hooks()
    # Assert: each example's grad sample is autograd of its loss alone, through its own mask
    assert_alone(fm, data, ours, dict(zip(packed.indices, packed.keys, strict=True)), task)


def test_private_masks_are_secret_unless_reproducible():
    # Prepare: a client of 10 examples, every one drawn (q = 1), round 3, step 2
    sampler = ClientSampler(range(10), seed=4)
    sampler.start_round(3)
    # Execute: two secret draws of the same step, and a reproducible one
    first, second = (poisson_batches([sampler], [1.0], reproducible=False, step=2).keys for _ in range(2))
    seeded = poisson_batches([sampler], [1.0], reproducible=True, step=2).keys
    # Assert: a secret draw's masks are fresh (so an example's mask is no function of its place among
    # the client's examples, which adding or removing another example shifts, and of --seed, which
    # is in config.json); --dp-reproducible keys them to the seed, round, step and place
    assert not torch.equal(first, second) and not torch.equal(first, seeded)
    assert torch.equal(seeded, row_keys(torch.full((10,), 4), torch.full((10,), 3), 2, torch.arange(10)))
