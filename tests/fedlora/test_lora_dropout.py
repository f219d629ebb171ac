"""--lora-dropout: the adapter reads a keyed dropout of its input in training only, the same in
every layout, and DP-SGD's per-example gradients read what the forward read."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from fedlora.kernels import row_keys
from fedlora.models.export import export_model
from fedlora.models.lora import BatchedLoRALinear, Router
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.models.state import extract_upload
from fedlora.privacy.dpsgd import Capture, grad_samples
from fedlora.strategies import GlobalState, Probe
from fedlora.strategies.fed_sb import FedSB
from fedlora.tasks import get_task
from fedlora.training.sketch import client_sketches
from fedlora.training.train import ClientSampler, TrainConfig, train_clients


@pytest.fixture(scope="module")
def base(tiny_bert_dir):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)


def _data(n=24, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq, dtype=torch.long)
    for i in range(n):  # rows of different lengths: a step runs as micro-batches of similar lengths
        mask[i, 3 + (7 * i) % 8:] = 0
    return {"input_ids": torch.randint(5, 1000, (n, seq), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 3, (n,), generator=g)}


def _model(base, ranks, dropout, seed=1, targets=None):
    """Slots that all differ, B ≠ 0 (so the adapter's input matters from the first step)."""
    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=ranks, alpha=8.0, dropout=dropout,
                                                           target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    for layer in fm.adapters.values():
        for k, r in enumerate(ranks):
            layer.set_slot(k, torch.randn(r, layer.lora_A.shape[-1], generator=gen) * 0.3,
                           torch.randn(layer.lora_B.shape[1], r, generator=gen) * 0.3)
    return fm


def test_forward_by_hand_with_keys_and_without():
    # Prepare: W = [[1,0,2],[0,1,-1]], b = [0.5,-0.5], A = [[1,1,0],[0,1,1]], B = diag(1, 2), s = 2/2;
    # key 96 on layer 3 at P = 0.5 keeps token 0's features 1, 2 and token 1's feature 0
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5]))
    router = Router()
    layer = BatchedLoRALinear(lin, [2], alpha=2.0, router=router, dropout=0.5, layer_id=3)
    layer.set_slot(0, torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]),
                   torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    x = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    # Execute: a training pass's keys, then none
    router.keys = torch.tensor([96])
    dropped = layer(x)
    router.keys = None
    plain = layer(x)
    # Assert: base x W^T + b = [7.5, -1.5], [16.5, -1.5] from x itself; the adapter reads 2·kept:
    # token 0 [0, 4, 6] -> A: [4, 10] -> B: [4, 20]; token 1 [8, 0, 0] -> [8, 0] -> [8, 0]
    assert torch.equal(dropped, torch.tensor([[[11.5, 18.5], [24.5, -1.5]]]))
    # without keys: token 0 A x = [3, 5] -> [3, 10]; token 1 [9, 11] -> [9, 22]
    assert torch.equal(plain, torch.tensor([[[10.5, 8.5], [25.5, 20.5]]]))


def test_no_dropout_in_evaluation_and_none_at_p_zero(base):
    # Prepare: P = 0.5 and a batch's keys
    data = _data(n=4)
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    keys = row_keys(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long), 0, torch.arange(4))
    fm = _model(base, [4], 0.5)
    # Execute: evaluation mode (keys ignored), then training mode with and without keys
    fm.eval()
    evaluated = fm(dropout_keys=keys, **inputs).logits
    plain = fm(**inputs).logits
    fm.train()
    trained = fm(dropout_keys=keys, **inputs).logits
    fm.eval()
    # Assert: evaluation is the model without dropout, training is not, and eval() clears the keys
    assert torch.equal(evaluated, plain)
    assert not torch.allclose(trained, plain, atol=1e-3)
    assert fm.router.keys is None
    # P = 0: the adapter reads the input itself, keys or not (bit for bit the model without the flag)
    zero = _model(base, [4], 0.0)
    layer = next(iter(zero.adapters.values()))
    zero.router.keys = keys
    x = torch.randn(4, 10, layer.lora_A.shape[-1])
    assert layer.dropped(x) is x


def test_batched_equals_one_by_one_across_micro_batches_and_dropout_moves_the_result(base):
    # Prepare: 3 clients of 8 rows of different lengths (each step splits into length groups, which
    # differ batched and alone), ranks 2, 4, 4, P = 0.1
    data, parts = _data(), [range(0, 8), range(8, 16), range(16, 24)]
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=1e-2)
    runs = {}
    for p in (0.1, 0.0):
        fm = _model(base, [2, 4, 4], p)
        # Execute
        train_clients(fm, data, [ClientSampler(part, 5 + k) for k, part in enumerate(parts)], cfg, rnd=2)
        runs[p] = fm
    # Assert: each client alone (its own slot of a one-slot model) reaches its batched adapter
    for k, part in enumerate(parts):
        one = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[[2, 4, 4][k]], alpha=8.0, dropout=0.1))
        start = _model(base, [2, 4, 4], 0.1)
        for name, layer in one.adapters.items():
            layer.set_slot(0, *start.adapters[name].get_slot(k))
        one.heads["classifier"].set_slot(0, start.heads["classifier"].get_slot(k))
        train_clients(one, data, [ClientSampler(part, 5 + k)], cfg, rnd=2)
        got, want = extract_upload(runs[0.1], k, 8), extract_upload(one, 0, 8)
        for layer, (A, B) in got.factors.items():
            torch.testing.assert_close(A, want.factors[layer][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(B, want.factors[layer][1], rtol=1e-5, atol=1e-6)
        without = extract_upload(runs[0.0], k, 8)
        assert any(not torch.allclose(B, without.factors[n][1], atol=1e-4)
                   for n, (_, B) in got.factors.items())


@pytest.mark.parametrize("targets", [None, ["all-linear"]])  # all-linear: BERT's pooler reads (N, d)
def test_per_example_gradients_with_dropout_equal_autograd_one_example_at_a_time(base, targets):
    # Prepare: P = 0.3, 5 rows of different lengths with their keys, in training mode
    data = _data(n=5, seed=2)
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    keys = row_keys(torch.full((5,), 3), torch.full((5,), 1), 2, torch.arange(5))
    task = get_task("classification")
    fm = _model(base, [4], 0.3, targets=targets)
    fm.train()
    # Execute: fedlora's per-example gradients from one batched pass
    with Capture(fm.client_layers()) as cap:
        task.row_losses(fm(dropout_keys=keys, **inputs).logits, data["labels"]).sum().backward()
    ours = {id(p): g for p, g in grad_samples(fm, cap, torch.zeros(5, dtype=torch.long))}
    # Assert: each equals autograd of that example's own loss, run alone with its own key
    for i in range(5):
        fm.zero_grad(set_to_none=True)
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        logits = fm(dropout_keys=keys[i:i + 1], **one).logits
        task.row_losses(logits, data["labels"][i:i + 1]).sum().backward()
        for p in fm.trainable_parameters():
            torch.testing.assert_close(ours[id(p)][i], p.grad[0], rtol=1e-4, atol=1e-6)
    fm.eval()


def test_export_records_lora_dropout(base, tmp_path):
    fm = _model(base, [4], 0.05)
    factors = {n: layer.get_slot(0) for n, layer in fm.adapters.items()}
    state = GlobalState(factors=factors, scale=2.0, head=fm.heads["classifier"].get_slot(0))
    out = export_model(fm, state, tmp_path / "adapter", "base", "SEQ_CLS")
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.05


def test_fed_sb_initialisation_sketches_read_the_input_without_dropout(base):
    # Prepare: Fed-SB models with and without --lora-dropout, as built (a new model is in training mode)
    data, cfg = _data(n=8), TrainConfig(batch_size=4)
    fms = {p: FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[2, 2], alpha=4.0,
                                                                plan=FedSB.adapter_plan, dropout=p))
           for p in (0.5, 0.0)}
    probes = {n: Probe() for n in fms[0.0].adapters}
    # Execute: each client's dense G_k = Σ g xᵀ of the frozen weights
    got = {p: client_sketches(fm, data, [ClientSampler(range(4 * k, 4 * k + 4), 11 + k) for k in range(2)],
                              cfg, 2, probes) for p, fm in fms.items()}
    # Assert: the frozen weights read x itself, so the sketch is the one without dropout
    for name in probes:
        torch.testing.assert_close(got[0.5][name], got[0.0][name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_recomputes_the_same_masks(base):
    # Prepare: P = 0.3, the same start with and without --gradient-checkpointing (the backward then
    # recomputes each block's forward, adapters and their dropout included)
    data, cfg = _data(), TrainConfig(local_steps=2, batch_size=4, lr=1e-2)
    runs, calls = {}, {}
    for ckpt in (False, True):
        fm = _model(base, [4], 0.3)
        fm.config.gradient_checkpointing = ckpt
        if ckpt:
            fm.model.gradient_checkpointing_enable({"use_reentrant": False})
        layer = next(iter(fm.adapters.values()))
        calls[ckpt] = 0
        layer.register_forward_pre_hook(lambda *_, c=ckpt: calls.__setitem__(c, calls[c] + 1))
        # Execute
        train_clients(fm, data, [ClientSampler(range(8), 5)], cfg, rnd=1)
        runs[ckpt] = extract_upload(fm, 0, 8)
    # Assert: the backward did recompute the adapters' forwards, with the same masks: the same adapter
    assert calls[True] == 2 * calls[False] > 0
    for layer, (A, B) in runs[True].factors.items():
        torch.testing.assert_close(A, runs[False].factors[layer][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B, runs[False].factors[layer][1], rtol=1e-5, atol=1e-6)


def test_the_decoders_cached_passes_drop_nothing_whatever_a_training_pass_left(tiny_llama_dir):
    # Prepare: P = 0.5, a causal LM whose last training pass (2 rows, keyed) left its keys on the router
    # (kept for the backward hooks; a round that raised before its end never cleared them)
    from transformers import AutoModelForCausalLM

    from fedlora.tasks.decode import score_and_generate
    fm = _model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), [4], 0.5)
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11], [12]]
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    fm.train()
    fm(input_ids=ids, dropout_keys=row_keys(torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long),
                                            0, torch.arange(2)))
    # Execute: the decoder's scoring (its own cached passes) with the keys left, then without
    left = score_and_generate(fm, prompts, completions, 3, [0], 0)
    fm.eval()
    clean = score_and_generate(fm, prompts, completions, 3, [0], 0)
    # Assert: the same scores and answers: evaluation drops nothing
    torch.testing.assert_close(left[0], clean[0])
    assert left[2] == clean[2]
