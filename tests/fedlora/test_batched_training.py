"""K clients trained batched == the same K clients trained one by one; padding stays zero."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fedlora.models.model import AdapterConfig, FederatedModel, find_targets
from fedlora.models.state import extract_upload
from fedlora.strategies.fed_sb import FedSB
from fedlora.strategies.plan import LORA
from fedlora.training.train import ClientSampler, TrainConfig, clip_per_client, train_clients


def _data(n: int = 24, seq: int = 12, vocab: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, vocab, (n, seq), generator=g),
        "attention_mask": torch.ones(n, seq, dtype=torch.long),
        "labels": torch.randint(0, 3, (n,), generator=g),
    }


def _wrap(base, ranks, mode="lora", seed=0, dropout=0.0) -> FederatedModel:
    plan = FedSB.adapter_plan if mode == "lora-sb" else LORA
    fm = FederatedModel(copy.deepcopy(base),
                        AdapterConfig(ranks=ranks, alpha=8.0, plan=plan, dropout=dropout))
    fm.reset_adapters(seed) if mode == "lora" else None
    return fm


@pytest.fixture(scope="module")
def base(tiny_bert_dir):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(b.norm(), 1e-12))


@pytest.mark.parametrize("ranks,dropout", [([4, 4, 4], 0.0), ([2, 4, 8], 0.0), ([2, 4, 8], 0.1)])
def test_batched_equals_one_by_one(base, ranks, dropout):
    # Prepare: 3 clients with disjoint data, same initial adapter, same sampler seeds (--lora-dropout:
    # each row's mask is keyed to its client's seed, round, step and place, not to the pass)
    data = _data()
    parts = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    cfg = TrainConfig(local_steps=4, batch_size=3, lr=1e-2, max_grad_norm=0.5)
    batched = _wrap(base, ranks, dropout=dropout)
    # Execute: all clients in one pass, then each client alone in a K=1 model
    train_clients(batched, data, [ClientSampler(p, seed=k) for k, p in enumerate(parts)], cfg)
    singles = []
    for k, p in enumerate(parts):
        solo = _wrap(base, [ranks[k]], dropout=dropout)
        train_clients(solo, data, [ClientSampler(p, seed=k)], cfg)
        singles.append(extract_upload(solo, 0, len(p)))
    # Assert: every factor and head tensor agrees to 1e-5 relative
    for k in range(3):
        got = extract_upload(batched, k, len(parts[k]))
        for layer, (A, B) in got.factors.items():
            A1, B1 = singles[k].factors[layer]
            assert A.shape == (ranks[k], A.shape[1])
            assert _rel(A, A1) <= 1e-5 and _rel(B, B1) <= 1e-5
            assert B.abs().sum() > 0, "training moved B away from zero"
        for key, t in got.head.items():
            assert _rel(t, singles[k].head[key]) <= 1e-5


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_sb_batched_equals_one_by_one(base, dropout):
    # Prepare: shared frozen A, B and a common R_0 in every slot
    data = _data(seed=1)
    parts = [list(range(0, 12)), list(range(12, 24))]
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=1e-2)
    g = torch.Generator().manual_seed(3)
    batched = _wrap(base, [4, 4], mode="lora-sb", dropout=dropout)
    shared = {n: (torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g))
              for n in batched.adapters}
    R0 = torch.randn(4, 4, generator=g)

    def load(fm):
        for n, layer in fm.adapters.items():
            layer.set_shared(*shared[n])
            for k in range(fm.num_clients):
                layer.set_core(k, R0)
    load(batched)
    # Execute
    train_clients(batched, data, [ClientSampler(p, seed=k) for k, p in enumerate(parts)], cfg)
    for k, p in enumerate(parts):
        solo = _wrap(base, [4], mode="lora-sb", dropout=dropout)
        load(solo)
        train_clients(solo, data, [ClientSampler(p, seed=k)], cfg)
        # Assert: R_k agrees, and moved away from R_0
        for n in batched.adapters:
            Rb, Rs = batched.adapters[n].get_core(k), solo.adapters[n].get_core(0)
            assert _rel(Rb, Rs) <= 1e-5
            assert not torch.allclose(Rb, R0)


def test_heterogeneous_padding_stays_exactly_zero(base):
    # Prepare: ranks 1, 3, 6 padded to 6; weight decay on, to catch any leak
    data = _data(seed=2)
    fm = _wrap(base, [1, 3, 6])
    cfg = TrainConfig(local_steps=3, batch_size=4, lr=5e-2, weight_decay=0.1)
    # Execute
    train_clients(fm, data, [ClientSampler(range(k * 8, k * 8 + 8), seed=k) for k in range(3)], cfg)
    # Assert: entries beyond r_k are exactly 0.0, inside they moved
    for layer in fm.adapters.values():
        for k, r in enumerate([1, 3, 6]):
            assert torch.count_nonzero(layer.lora_A[k, r:]) == 0
            assert torch.count_nonzero(layer.lora_B[k, :, r:]) == 0
            assert torch.count_nonzero(layer.lora_B[k, :, :r]) > 0


def test_clip_per_client_bounds_each_client_norm():
    # Prepare: client 0 has gradient norm 5 (3-4-0), client 1 norm 0.5
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]])
    # Execute
    norms = clip_per_client([p], max_norm=1.0)
    # Assert: client 0 scaled to norm 1, client 1 untouched
    assert torch.allclose(norms, torch.tensor([5.0, 0.5]))
    assert torch.allclose(p.grad[0], torch.tensor([0.6, 0.8, 0.0]), atol=1e-6)
    assert torch.allclose(p.grad[1], torch.tensor([0.3, 0.4, 0.0]))


def test_forward_matches_dense_merged_weights(base):
    # Prepare: random adapters in 2 slots; reference = a copy of the base with W0 + s B A merged
    fm = _wrap(base, [2, 4])
    g = torch.Generator().manual_seed(5)
    for layer in fm.adapters.values():
        for k, r in enumerate([2, 4]):
            layer.set_slot(k, torch.randn(r, 32, generator=g), torch.randn(32, r, generator=g))
    data = _data(n=4, seed=3)
    ids = torch.tensor([1, 0, 1, 0])
    # Execute
    out = fm(client_ids=ids, input_ids=data["input_ids"],
             attention_mask=data["attention_mask"]).logits
    # Assert: row i equals the merged model of client ids[i]
    for k in (0, 1):
        ref = copy.deepcopy(base)
        for name, layer in fm.adapters.items():
            A, B = layer.get_slot(k)
            ref.get_submodule(name).weight.data += layer.scale[k] * B @ A
            ref.classifier.weight.data = fm.heads["classifier"].weight[k].detach().clone()
        ref.eval()
        want = ref(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        rows = ids == k
        assert torch.allclose(out[rows], want[rows], atol=1e-5)


def test_unknown_target_modules_error_lists_names(base, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="no linear layer matches nope.*query"):
        find_targets(copy.deepcopy(base), ["nope"])
    with pytest.raises(ValueError, match="matches query,value; give several names apart"):
        find_targets(copy.deepcopy(base), ["query,value"])           # as PEFT's config lists them
    with pytest.raises(ValueError, match="matches lm_head; the output embeddings .* are never adapted"):
        find_targets(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), ["lm_head"])


def _ragged(n: int = 24, width: int = 16, seed: int = 2) -> dict[str, torch.Tensor]:
    """Rows of 3..width real tokens, right-padded to ``width`` (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, 1000, (n, width), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g)}


def test_dynamic_padding_equals_fixed_padding_and_one_by_one(base):
    # Prepare: ragged rows; three clients, each pass is cut to its own longest row
    data = _ragged()
    parts = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    dyn, fixed = TrainConfig(local_steps=3, batch_size=3, lr=1e-2), \
        TrainConfig(local_steps=3, batch_size=3, lr=1e-2, pad_to_longest=False)
    # Execute: batched with dynamic padding, batched padded to the full width, each client alone
    runs = []
    for cfg in (dyn, fixed):
        fm = _wrap(base, [4, 4, 4])
        train_clients(fm, data, [ClientSampler(p, seed=k) for k, p in enumerate(parts)], cfg)
        runs.append([extract_upload(fm, k, 8) for k in range(3)])
    solo = []
    for k, p in enumerate(parts):
        fm = _wrap(base, [4])
        train_clients(fm, data, [ClientSampler(p, seed=k)], dyn)
        solo.append(extract_upload(fm, 0, 8))
    # Assert: the same adapters (padding is masked out of attention, so width does not matter)
    for k in range(3):
        for other in (runs[1][k], solo[k]):
            for layer, (A, B) in runs[0][k].factors.items():
                assert _rel(A, other.factors[layer][0]) <= 1e-5 and _rel(B, other.factors[layer][1]) <= 1e-5


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_trains_the_same_adapters(tiny_llama_dir, dropout):
    # Prepare: a tiny LLaMA, two clients in one pass, with and without activation checkpointing
    # (--lora-dropout: the recomputation draws the same masks, from the rows' keys)
    from transformers import AutoModelForCausalLM

    from fedlora.tasks import get_task

    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    data = _ragged(n=16, seed=3)
    data["labels"] = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    parts = [list(range(0, 8)), list(range(8, 16))]
    cfg = TrainConfig(task=get_task("causal-lm"), local_steps=3, batch_size=4, lr=1e-2)
    ups, forwards = [], []
    for ckpt in (False, True):
        fm = FederatedModel(copy.deepcopy(lm), AdapterConfig(ranks=[4, 4], alpha=8.0, train_head=False,
                                                             gradient_checkpointing=ckpt, dropout=dropout))
        fm.reset_adapters(0)
        calls = []
        fm.model.model.layers[0].self_attn.register_forward_hook(lambda *_, c=calls: c.append(1))
        # Execute
        train_clients(fm, data, [ClientSampler(p, seed=k) for k, p in enumerate(parts)], cfg)
        ups.append([extract_upload(fm, k, 8) for k in range(2)])
        forwards.append(len(calls))
    assert forwards[1] == 2 * forwards[0] >= 6  # checkpointing runs each block again in the backward pass
    # Assert: identical training (the recomputation routes rows to the same client slots)
    for k in range(2):
        for layer, (A, B) in ups[0][k].factors.items():
            A1, B1 = ups[1][k].factors[layer]
            assert _rel(A, A1) <= 1e-5 and _rel(B, B1) <= 1e-5
            assert B.abs().sum() > 0
