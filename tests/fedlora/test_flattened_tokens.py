"""A model that flattens its tokens before a layer (OPT's MLP: ``(N, T, d) -> (N·T, d)``): each
token of a batch row is routed to that row's client slot, DP-SGD's per-example gradients sum the
row's tokens, and Opacus, which would take every token for an example, is refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from fedlora.errors import UserError
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.privacy.accounting import Budget
from fedlora.privacy.dpsgd import Capture, grad_samples
from fedlora.privacy.opacus_dp import opacus_train_client
from fedlora.tasks import get_task
from fedlora.training.train import ClientSampler, TrainConfig

FC = ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"]


@pytest.fixture(scope="module")
def opt():
    """A 1-block, 16-wide random OPT causal LM (200 tokens); its MLP runs on flattened tokens."""
    cfg = OPTConfig(vocab_size=200, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    word_embed_proj_dim=16, max_position_embeddings=32, pad_token_id=1)
    torch.manual_seed(0)
    return OPTForCausalLM(cfg).eval()


def _model(base, slots: int) -> FederatedModel:
    """``base`` with r = 2 adapters on every linear layer, slot k's factors drawn from seed k."""
    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[2] * slots, target_modules=["all-linear"]))
    for layer in fm.adapters.values():
        for k in range(slots):
            gen = torch.Generator().manual_seed(k)
            d_out, d_in = layer.lora_B.shape[1], layer.lora_A.shape[2]
            A, B = torch.randn(2, d_in, generator=gen), torch.randn(d_out, 2, generator=gen)
            layer.set_slot(k, A * 0.3, B * 0.3)
    return fm


def _ids(n: int = 4, seq: int = 6) -> torch.Tensor:
    return torch.randint(2, 200, (n, seq), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("client_ids", [[0, 0, 1, 1], [1, 0, 0, 1]], ids=["segments", "gather"])
def test_each_token_of_a_flattened_layer_gets_its_rows_client(opt, client_ids):
    # Prepare: two clients' adapters in one model, on fc1/fc2 too (whose inputs are N·T rows)
    ids = _ids()
    fm = _model(opt, 2)
    assert set(FC) <= set(fm.adapters)
    # Execute: one batched forward, rows routed as given (contiguous segments, or gathered)
    with torch.no_grad():
        got = fm(input_ids=ids, client_ids=torch.tensor(client_ids)).logits
    # Assert: each row's logits are those of its client's adapters alone (a one-slot model holding
    # that client's factors), and the two clients' rows differ from each other
    for k in (0, 1):
        alone = _model(opt, k + 1)
        rows = [i for i, c in enumerate(client_ids) if c == k]
        with torch.no_grad():
            want = alone(input_ids=ids[rows], client_ids=torch.full((len(rows),), k)).logits
        torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        swapped = fm(input_ids=ids, client_ids=1 - torch.tensor(client_ids)).logits
    assert (swapped - got).abs().max() > 1e-3


def test_per_example_gradients_over_flattened_tokens_equal_one_backward_per_example(opt):
    # Prepare: one slot; the loss of each row is its tokens' summed logits squared
    ids = _ids()
    fm = _model(opt, 1)

    def losses(model, x):
        return model(input_ids=x).logits.pow(2).sum(dim=(1, 2)) * 1e-3

    # Execute: fedlora's per-example gradients (hooks and kernels), and a backward per example
    with Capture(fm.client_layers()) as cap:
        losses(fm, ids).sum().backward()
    ours = {id(p): g for p, g in grad_samples(fm, cap, torch.zeros(4, dtype=torch.long))}
    params = [p for p in fm.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    for i in range(4):
        grads = torch.autograd.grad(losses(fm, ids[i:i + 1]).sum(), params)
        # Assert: example i's gradient of every factor, fc1 and fc2 included
        for p, g in zip(params, grads, strict=True):
            torch.testing.assert_close(ours[id(p)][i], g[0], rtol=1e-4, atol=1e-7)
    assert len(ours) == 2 * len(fm.adapters)


def test_opacus_is_refused_over_a_flattened_layer_in_one_line(opt):
    # Prepare: a one-slot model over fc1/fc2, a client's rows and its DP budget
    fm = _model(opt, 1)
    data = {"input_ids": _ids(8), "attention_mask": torch.ones(8, 6, dtype=torch.long)}
    data["labels"] = data["input_ids"].clone()
    cfg = TrainConfig(local_steps=1, batch_size=4, lr=1e-2, max_grad_norm=1.0, dp_sample=True,
                      dp_reproducible=True, dp_backend="opacus", task=get_task("causal-lm"))
    budget = Budget(sigma=1.0, sample_rate=0.5, delta=1e-5, epsilon=100.0)
    # Execute / Assert: the refusal names the backend that can, and the other way out
    with pytest.raises(UserError, match="use --dp-backend fedlora, or leave the layer out of --target"):
        opacus_train_client(fm, data, ClientSampler(range(8), 0), cfg, budget, rnd=1)


def test_a_sequence_first_layer_is_refused_in_one_line_not_routed_by_position():
    # Prepare: Longformer's attention runs its query/value layers on (T, N, d): 8 tokens, 2 rows
    from transformers import LongformerConfig, LongformerForSequenceClassification

    cfg = LongformerConfig(vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, attention_window=4, max_position_embeddings=40,
                           pad_token_id=1)
    torch.manual_seed(0)
    fm = FederatedModel(LongformerForSequenceClassification(cfg).eval(), AdapterConfig(ranks=[2, 2]))
    # Execute / Assert: two clients' rows cannot be told apart in such a layer: refused, naming the fix
    with torch.no_grad(), pytest.raises(UserError, match=r"shape \(8, 2, 16\) for a batch of 2 rows.*"
                                                         "leave that layer out of --target-modules"):
        fm(input_ids=_ids(2, 8), client_ids=torch.tensor([0, 1]))
