"""Models beyond BERT and LLaMA: GPT-2's ``Conv1D`` layers get adapters like ``nn.Linear`` ones, and
the export loads into PEFT, which stores those layers transposed (``fan_in_fan_out``); every
classification head a model has trains (DistilBERT's two layers, BART's ``classification_head``, XLM's
``sequence_summary``)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2LMHeadModel,
)
from transformers.pytorch_utils import Conv1D

from fedlora.models.export import export_model
from fedlora.models.model import AdapterConfig, FederatedModel, as_linear, find_targets, layer_dims
from fedlora.simulations.cli import build_parser, check_args
from fedlora.simulations.engine import train

peft = pytest.importorskip("peft")

C_ATTN = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def _ids(n: int = 3, seq: int = 9) -> torch.Tensor:
    return torch.randint(5, 1000, (n, seq), generator=torch.Generator().manual_seed(3))


def test_a_conv1d_becomes_the_linear_that_computes_the_same():
    # Prepare: GPT-2's layer y = x W + b with W stored d_in × d_out (4 inputs, 6 outputs)
    torch.manual_seed(0)
    conv = Conv1D(6, 4)
    nn.init.normal_(conv.bias)
    x = torch.randn(2, 5, 4)
    # Execute
    linear = as_linear(conv)
    # Assert: an nn.Linear of weight Wᵀ, frozen, and one output worked by hand
    assert isinstance(linear, nn.Linear) and tuple(linear.weight.shape) == (6, 4)
    assert layer_dims(conv) == (6, 4) and not linear.weight.requires_grad
    torch.testing.assert_close(linear(x), conv(x))
    by_hand = sum(float(x[1, 2, i] * conv.weight[i, 5]) for i in range(4)) + float(conv.bias[5])
    assert float(linear(x)[1, 2, 5]) == pytest.approx(by_hand, abs=1e-6)
    assert as_linear(linear) is linear


def test_gpt2_is_adapted_on_c_attn_by_default_and_starts_as_its_base(tiny_gpt2_dir):
    # Prepare
    ids = _ids()
    want = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)(input_ids=ids).logits
    # Execute
    fm = FederatedModel(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), AdapterConfig(ranks=[4, 4]))
    names, _ = find_targets(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), ["all-linear"])
    # Assert: the fused q/k/v layers (a Conv1D each) hold the adapters; B = 0 leaves the base's logits
    assert sorted(fm.adapters) == C_ATTN == fm.transposed
    assert len(names) == 8 and "lm_head" not in names   # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    got = fm(input_ids=ids, client_ids=torch.tensor([0, 1, 1])).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


#: One attention block and 2 heads of 8 (16 wide), 32-wide MLPs, 100 tokens.
BLOCK = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
         "vocab_size": 100}
SELF = "deberta.encoder.layer.0.attention.self"
T5 = [f"transformer.{part}.block.0.layer.{i}.{kind}.{n}" for part, i, kind in
      [("encoder", 0, "SelfAttention"), ("decoder", 0, "SelfAttention"), ("decoder", 1, "EncDecAttention")]
      for n in "qv"]
BART = [f"model.{part}.layers.0.{kind}.{n}_proj" for part, kind in
        [("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "encoder_attn")] for n in ("q", "v")]
SEQ2SEQ_HEAD = ["classification_head.dense", "classification_head.out_proj"]
#: Architecture -> (its config class and toy sizes, the layers adapted by default, its head's layers).
ARCHITECTURES = {
    "bart": ("BartConfig", {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "vocab_size": 100,
                            "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32,
                            "decoder_ffn_dim": 32}, BART, SEQ2SEQ_HEAD),
    "gpt2": ("GPT2Config", {"n_embd": 16, "n_layer": 1, "n_head": 2, "vocab_size": 100},
             ["transformer.h.0.attn.c_attn"], ["score"]),
    "bloom": ("BloomConfig", {"hidden_size": 16, "n_layer": 1, "n_head": 2, "vocab_size": 100},
              ["transformer.h.0.self_attention.query_key_value"], ["score"]),
    "gpt_neox": ("GPTNeoXConfig", BLOCK, ["gpt_neox.layers.0.attention.query_key_value"], ["score"]),
    "phi3": ("Phi3Config", {**BLOCK, "pad_token_id": 0}, ["model.layers.0.self_attn.qkv_proj"], ["score"]),
    "mpt": ("MptConfig", {"d_model": 16, "n_layers": 1, "n_heads": 2, "vocab_size": 100},
            ["transformer.blocks.0.attn.Wqkv"], ["score"]),
    "deberta": ("DebertaConfig", BLOCK, [f"{SELF}.in_proj"], ["classifier"]),
    "deberta-v2": ("DebertaV2Config", BLOCK, [f"{SELF}.query_proj", f"{SELF}.value_proj"], ["classifier"]),
    "funnel": ("FunnelConfig", {"d_model": 16, "n_head": 2, "d_head": 8, "d_inner": 32, "block_sizes": [1, 1],
                                "vocab_size": 100},
               [f"funnel.encoder.blocks.{b}.0.attention.{n}_head" for b in (0, 1) for n in "qv"],
               ["classifier.linear_hidden", "classifier.linear_out"]),
    "xlm": ("XLMConfig", {"emb_dim": 16, "n_layers": 1, "n_heads": 2, "vocab_size": 100},
            [f"transformer.attentions.0.{n}_lin" for n in "qv"], ["sequence_summary.summary"]),
    "t5": ("T5Config", {"d_model": 16, "d_ff": 32, "num_layers": 1, "num_heads": 2, "d_kv": 8,
                        "vocab_size": 100}, T5, SEQ2SEQ_HEAD),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_architecture_gets_its_attention_adapted_and_its_head_trained(arch):
    # Prepare: the model at toy size, weightless (meta device)
    import transformers

    config, sizes, targets, heads = ARCHITECTURES[arch]
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(getattr(transformers, config)(**sizes))
    # Execute
    fm = FederatedModel(model, AdapterConfig(ranks=[2]))
    # Assert: the fused or separate query/value layers hold adapters; every head layer is a client's own
    assert sorted(fm.adapters) == sorted(targets)
    assert sorted(fm.heads) == heads
    assert all(p.requires_grad for head in fm.heads.values() for p in head.parameters())


def _run(model, data, out, *extra):
    argv = ["--model", str(model), "--data", str(data), "--out", str(out), "--num-clients", "3",
            "--rounds", "2", "--local-steps", "3", "--batch-size", "4", "--rank", "4", "--max-length", "24",
            "--lr", "5e-2", "--quiet", *extra]
    return train(check_args(build_parser().parse_args(argv)), out)


def test_a_gpt2_run_exports_what_peft_loads_and_merges_to_the_same_logits(tiny_gpt2_dir, tiny_csv, tmp_path):
    # Prepare: 2 rounds of FLoRA classification on every Conv1D layer: its aggregates are folded into
    # the (Linear-converted) bases, and the export carries them as factors for PEFT's Conv1D layers
    job, coord = _run(tiny_gpt2_dir, tiny_csv, tmp_path / "run", "--strategy", "flora",
                      "--target-modules", "all-linear")
    ids = _ids()
    with torch.no_grad():
        ours = job.fm(input_ids=ids).logits
    # Execute: the run's export, loaded by PEFT onto a fresh GPT-2 (Conv1D layers), then merged
    out = export_model(job.fm, coord.state, tmp_path / "adapter", str(tiny_gpt2_dir), "SEQ_CLS")

    def base():
        return AutoModelForSequenceClassification.from_pretrained(tiny_gpt2_dir, num_labels=3)

    theirs = peft.PeftModel.from_pretrained(base(), out).eval()
    assert isinstance(theirs.get_submodule(f"base_model.model.{C_ATTN[0]}").get_base_layer(), Conv1D)
    with torch.no_grad():
        loaded = theirs(input_ids=ids).logits
        merged = theirs.merge_and_unload()(input_ids=ids).logits
        plain = base()(input_ids=ids).logits
    # Assert: the same logits loaded and merged (PEFT transposes B A into the Conv1D weight); GPT-2's
    # score head has no bias, and none was trained or exported
    assert job.fm.heads["score"].bias is None and "score.bias" not in coord.state.head
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    torch.testing.assert_close(loaded, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-4)
    assert (ours - plain).abs().max() > 100 * (loaded - ours).abs().max()


@pytest.fixture(scope="module")
def tiny_distilbert_dir(tmp_path_factory, tiny_bert_dir):
    """A 2-layer, 32-wide DistilBERT classifier (3 labels) with MiniLM's tokenizer (the tiny BERT's)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-distilbert")
    cfg = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    DistilBertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return path


def test_distilbert_trains_and_exports_both_head_layers(tiny_distilbert_dir, tiny_csv, tmp_path):
    # Prepare: DistilBERT's pre_classifier (d × d) and classifier
    start = DistilBertForSequenceClassification.from_pretrained(tiny_distilbert_dir).pre_classifier.weight
    # Execute
    job, coord = _run(tiny_distilbert_dir, tiny_csv, tmp_path / "run", "--max-length", "16")
    out = export_model(job.fm, coord.state, tmp_path / "adapter", str(tiny_distilbert_dir), "SEQ_CLS")
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_distilbert_dir), out).eval()
    ids = _ids()
    with torch.no_grad():
        ours, loaded = job.fm(input_ids=ids).logits, theirs(input_ids=ids).logits
    # Assert: both layers trained and travel; q_lin/v_lin are adapted; PEFT gives the same logits
    assert sorted(job.fm.heads) == ["classifier", "pre_classifier"]
    assert sorted({n.rsplit(".", 1)[1] for n in job.fm.adapters}) == ["q_lin", "v_lin"]
    assert not torch.equal(coord.state.head["pre_classifier.weight"], start)
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["classifier",
                                                                                        "pre_classifier"]
    torch.testing.assert_close(loaded, ours, rtol=1e-4, atol=1e-4)


def test_t5_runs_with_every_linear_layer_adapted():
    # Prepare: a toy T5 classifier; its MLP reads wo.weight beside the call (to cast its input)
    import transformers

    _, sizes, _, _ = ARCHITECTURES["t5"]
    torch.manual_seed(0)
    config = transformers.T5Config(**sizes, num_labels=3, decoder_start_token_id=0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    ids[:, -1] = model.config.eos_token_id
    with torch.no_grad():
        want = model(input_ids=ids).logits
    # Execute
    fm = FederatedModel(model, AdapterConfig(ranks=[2, 2], target_modules=["all-linear"]))
    with torch.no_grad():
        got = fm(input_ids=ids, client_ids=torch.tensor([0, 1])).logits
    # Assert: wo is adapted and shows its base's weight, as PEFT's layers do; B = 0 gives the base's logits
    wo = fm.adapters["transformer.encoder.block.0.layer.1.DenseReluDense.wo"]
    assert wo.weight is wo.base.weight and wo.bias is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_layer_whose_weight_the_model_uses_itself_is_refused():
    # Prepare: a toy Mamba, whose mixer multiplies by dt_proj.weight itself (then adds dt_proj.bias)
    from transformers import MambaConfig, MambaForCausalLM

    from fedlora.errors import UserError

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, state_size=4, expand=2)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    ok = FederatedModel(MambaForCausalLM(config), AdapterConfig(ranks=[2], target_modules=["x_proj"]))
    fm = FederatedModel(MambaForCausalLM(config), AdapterConfig(ranks=[2], target_modules=["dt_proj"]))
    # Execute / Assert: a layer the model calls passes; an adapter it would skip is refused in one line
    ok(input_ids=ids)
    with pytest.raises(UserError, match=r"computes with backbone.layers.0.mixer.dt_proj's weight itself"):
        fm(input_ids=ids)


def test_a_weight_read_before_the_first_pass_is_no_bypass():
    # Prepare: a layer the pass does not call, whose weight fedlora's own code read before it (export,
    # shapes): only what the model reads in the pass counts
    from types import SimpleNamespace

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, inputs_embeds):
            return SimpleNamespace(logits=self.used(inputs_embeds))

    fm = FederatedModel(Toy(), AdapterConfig(ranks=[2], target_modules=["used", "spare"]))
    assert fm.adapters["spare"].weight.shape == (4, 4)
    # Execute / Assert: no refusal
    assert fm(inputs_embeds=torch.randn(2, 3, 4)).logits.shape == (2, 3, 4)


def test_a_model_without_linear_layers_is_refused_saying_so():
    # Prepare: layers of other types only (I-BERT's are its own QuantLinear)
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.LayerNorm(4))
    # Execute / Assert: said plainly, not as a list of linear layer names reading "none"
    with pytest.raises(ValueError, match=r"^Sequential has no linear layer to adapt \(nn.Linear or"
                                         r" transformers' Conv1D\) outside its head"):
        find_targets(model, ["all-linear"])


def test_a_mamba_layer_peft_refuses_is_refused():
    # Prepare: a toy Mamba (weightless); PEFT refuses an adapter on a Mamba model's out_proj
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, state_size=4)
    with torch.device("meta"):
        model = MambaForCausalLM(config)
    # Execute / Assert: all-linear (out_proj among its layers) is refused in one line; in_proj passes
    with pytest.raises(ValueError, match=r"^PEFT refuses an adapter on backbone\.layers\.0\.mixer\.out_proj"
                                         r" of a mamba model"):
        FederatedModel(model, AdapterConfig(ranks=[2], target_modules=["all-linear"]))
    fm = FederatedModel(model, AdapterConfig(ranks=[2]))
    assert list(fm.adapters) == ["backbone.layers.0.mixer.in_proj"]


def test_peft_is_asked_only_of_models_it_could_refuse(monkeypatch):
    # Prepare: importing PEFT takes about 3 s and, through bitsandbytes, printed a CPU-kernel warning on
    # every run: a dense model (no fused experts, no Mamba) must not need it
    from transformers import LlamaConfig, LlamaForCausalLM

    import fedlora.models.peft_targets as peft_targets

    def asked():
        raise AssertionError("PEFT was imported for a dense model")

    monkeypatch.setattr(peft_targets, "_import_peft", asked)
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # Execute / Assert
    fm = FederatedModel(model, AdapterConfig(ranks=[2], target_modules=["all-linear"]))
    assert len(fm.adapters) == 7


@pytest.mark.parametrize("missing", [("peft.tuners.tuners_utils", "_check_lora_target_modules_mamba"),
                                     ("peft.utils.transformers_weight_conversion",
                                      "convert_peft_config_for_transformers")])
def test_a_peft_without_the_check_it_is_asked_is_not_asked(monkeypatch, missing):
    # Prepare: another PEFT version than the tests' (PEFT is no dependency of fedlora's), without the
    # private function a check asks; a toy Mamba and a toy DeepSeek-V3 (weightless) that reach both checks
    import importlib

    from transformers import AutoModelForCausalLM, DeepseekV3Config, MambaConfig, MambaForCausalLM

    pytest.importorskip("peft")
    pytest.importorskip("transformers.conversion_mapping")
    module, name = missing
    monkeypatch.delattr(importlib.import_module(module), name)
    with torch.device("meta"):
        mamba = MambaForCausalLM(MambaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                             state_size=4))
        moe = AutoModelForCausalLM.from_config(DeepseekV3Config(
            hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
            num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
            first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=8, n_group=1, topk_group=1, vocab_size=100))
    # Execute / Assert: that check is left out (as without PEFT), not an ImportError traceback
    for model, targets in ((mamba, ["x_proj"]), (moe, ["q_b_proj"])):
        FederatedModel(model, AdapterConfig(ranks=[2], target_modules=targets))
