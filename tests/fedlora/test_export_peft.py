"""The PEFT export loads with peft.PeftModel.from_pretrained and reproduces logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from fedlora.errors import UserError
from fedlora.models.export import LABELS, export_peft, read_labels
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.models.state import apply_global
from fedlora.strategies import GlobalState
from fedlora.strategies.fed_sb import FedSB
from fedlora.strategies.plan import LORA

peft = pytest.importorskip("peft")

LLAMA_LAYER = "model.layers.0.self_attn.q_proj"


def _inputs(n: int = 4, seq: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"input_ids": torch.randint(5, 1000, (n, seq), generator=g),
            "attention_mask": torch.ones(n, seq, dtype=torch.long)}


def _base(path):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)


def _random_state(fm: FederatedModel, mode: str, g: torch.Generator) -> GlobalState:
    head = {"classifier.weight": torch.randn(3, 32, generator=g),
            "classifier.bias": torch.randn(3, generator=g)}
    factors = {n: (torch.randn(4, 32, generator=g) * 0.3, torch.randn(32, 4, generator=g) * 0.3)
               for n in fm.adapters}
    if mode == "lora-sb":
        cores = {n: torch.randn(4, 4, generator=g) for n in fm.adapters}
        return GlobalState(factors=factors, scale=0.5, cores=cores, head=head)
    merged = {n: (torch.randn(6, 32, generator=g) * 0.2, torch.randn(32, 6, generator=g) * 0.2)
              for n in fm.adapters}
    return GlobalState(factors=factors, scale=2.0, merged=merged, head=head)


@pytest.mark.parametrize("mode", ["lora", "lora-sb"])
def test_export_reproduces_logits(tiny_bert_dir, tmp_path, mode):
    # Prepare: a model holding a global state with a live adapter, folded updates (LoRA)
    # or shared factors and cores (LoRA-SB), and a trained head
    plan = FedSB.adapter_plan if mode == "lora-sb" else LORA
    fm = FederatedModel(_base(tiny_bert_dir), AdapterConfig(ranks=[4], alpha=8.0, plan=plan))
    state = _random_state(fm, mode, torch.Generator().manual_seed(1))
    fold = {n: state.merged[n] for n in state.merged}
    apply_global(fm, state, fold, torch.Generator())
    x = _inputs()
    want = fm(**x).logits
    # Execute: export, then load with PEFT onto a fresh copy of the original base
    out = export_peft(state, list(fm.adapters), tmp_path / "adapter", str(tiny_bert_dir),
                      "SEQ_CLS", list(fm.heads))
    loaded = peft.PeftModel.from_pretrained(_base(tiny_bert_dir), out).eval()
    got = loaded(**x).logits
    # Assert: same logits, PEFT's key names and config
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    keys = load_file(out / "adapter_model.safetensors")
    layer = "bert.encoder.layer.0.attention.self.query"
    rank = 4 if mode == "lora-sb" else 10
    assert keys[f"base_model.model.{layer}.lora_A.weight"].shape == (rank, 32)
    assert keys[f"base_model.model.{layer}.lora_B.weight"].shape == (32, rank)
    assert "base_model.model.classifier.weight" in keys
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == rank


def test_export_replaces_previous_adapter_whole(tiny_bert_dir, tmp_path):
    # Prepare: an existing export with an extra stale file
    fm = FederatedModel(_base(tiny_bert_dir), AdapterConfig(ranks=[4], alpha=8.0))
    state = _random_state(fm, "lora", torch.Generator().manual_seed(2))
    target = tmp_path / "adapter"
    export_peft(state, list(fm.adapters), target, "base", "SEQ_CLS", list(fm.heads))
    (target / "stale.txt").write_text("x")
    # Execute
    export_peft(state, list(fm.adapters), target, "base", "SEQ_CLS", list(fm.heads))
    # Assert: exactly the two PEFT files, no temporary folders left behind
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]



def test_export_records_the_runs_label_names_beside_a_head(tiny_bert_dir, tmp_path):
    # Prepare: a global state with a 3-row head, and the run's label names in id order
    fm = FederatedModel(_base(tiny_bert_dir), AdapterConfig(ranks=[4], alpha=8.0))
    state = _random_state(fm, "lora", torch.Generator().manual_seed(4))
    names = ["neg", "neutral", "pos"]
    # Execute: with a head, and without one (no rows to name)
    out = export_peft(state, list(fm.adapters), tmp_path / "cls", str(tiny_bert_dir), "SEQ_CLS",
                      list(fm.heads), labels=names)
    bare = export_peft(state, list(fm.adapters), tmp_path / "lm", "base", "CAUSAL_LM", [], labels=names)
    # Assert: the names, in order, in their own file that PEFT ignores; none beside a headless adapter
    assert json.loads((out / LABELS).read_text()) == names and read_labels(out) == names
    assert read_labels(bare) is None and not (bare / LABELS).exists()
    peft.PeftModel.from_pretrained(_base(tiny_bert_dir), out)
    (out / LABELS).write_text('{"0": "neg"}')
    with pytest.raises(UserError, match="is not a JSON list of label names"):
        read_labels(out)

def test_sft_export_generates_the_same_greedy_tokens_with_peft(tiny_chat_llama_dir, tmp_path):
    # Prepare: the tiny chat LLaMA with a live global adapter on all linear layers (A and B random)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)

    fm = FederatedModel(base(), AdapterConfig(ranks=[4], alpha=8.0, target_modules=["all-linear"],
                                              train_head=False))
    g = torch.Generator().manual_seed(3)
    factors = {n: (torch.randn(4, layer.lora_A.shape[2], generator=g),
                   torch.randn(layer.lora_B.shape[1], 4, generator=g)) for n, layer in fm.adapters.items()}
    state = GlobalState(factors=factors, scale=2.0)
    apply_global(fm, state, {})
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "great film"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    prompt = {k: ids[k] for k in ("input_ids", "attention_mask")}
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    ours = fm.generate(**prompt, **kw)
    # Execute: export as a CAUSAL_LM adapter, load with PEFT onto a fresh base
    out = export_peft(state, list(fm.adapters), tmp_path / "adapter", str(tiny_chat_llama_dir),
                      "CAUSAL_LM", [])
    theirs = peft.PeftModel.from_pretrained(base(), out).eval().generate(**prompt, **kw)
    # Assert: the same greedy tokens, and the adapter changed them (it is not a no-op)
    assert ours.tolist() == theirs.tolist()
    assert ours.tolist() != base().generate(**prompt, **kw).tolist()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and len(config["target_modules"]) == 14


@pytest.mark.parametrize("strategy", ["fedavg", "flora"])
def test_export_onto_the_same_nf4_base_gives_fedloras_greedy_answers(tiny_chat_llama_dir, sentiment_tsv,
                                                                     tmp_path, strategy):
    # Prepare: a round of sft over an nf4 base on every linear layer (FLoRA folds its stacks into
    # each layer's residual beside the 4-bit weight; FedAvg keeps a live adapter)
    pytest.importorskip("bitsandbytes")
    from fedlora.models.hub import load_model
    from fedlora.models.lora import is_quantized as bnb_layer
    from tests.fedlora.test_quantize import _trained

    flags = ["--task", "sft", "--model", str(tiny_chat_llama_dir), "--data", str(sentiment_tsv),
             "--text-column", "sentence", "--label-words", "0=negative,1=positive", "--prompt-template",
             "Review: {text}", "--num-clients", "3", "--rounds", "1", "--local-steps", "3", "--batch-size",
             "4", "--rank", "4", "--max-length", "24", "--lr", "5e-2", "--quantize", "nf4", "--eval-max", "3",
             "--target-modules", "all-linear", "--strategy", strategy]
    job, coord = _trained([*flags, "--out", str(tmp_path / "run"), "--quiet"], tmp_path / "run")
    if strategy == "flora":
        assert all(layer.fold_U.shape[1] == 12 for layer in job.fm.adapters.values())  # 3 clients × r
    prompts = [torch.tensor([p]) for p in job.test.prompts[:3]]   # rendered as the evaluation does
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": job.test.tokenizer.pad_token_id}
    with torch.no_grad():
        ours = [job.fm.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw) for p in prompts]
        ours_logits = job.fm(input_ids=prompts[0]).logits
    # Execute: export, load with PEFT onto a freshly loaded nf4 base
    out = export_peft(coord.state, list(job.fm.adapters), tmp_path / "adapter", str(tiny_chat_llama_dir),
                      "CAUSAL_LM", [])

    def base():
        return load_model(str(tiny_chat_llama_dir), "causal-lm", quantize="nf4")[0]

    theirs = peft.PeftModel.from_pretrained(base(), out).eval()
    wrapped = theirs.get_submodule(f"base_model.model.{LLAMA_LAYER}")
    assert isinstance(wrapped, peft.tuners.lora.LoraLayer) and bnb_layer(wrapped.get_base_layer())
    # Assert: the same greedy tokens and logits; the adapter moved the logits (it is not a no-op)
    with torch.no_grad():
        for p, want in zip(prompts, ours, strict=True):
            got = theirs.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw)
            assert got.tolist() == want.tolist()
        got_logits = theirs(input_ids=prompts[0]).logits
        plain = base()(input_ids=prompts[0]).logits
    torch.testing.assert_close(got_logits, ours_logits, rtol=1e-4, atol=1e-4)
    assert (ours_logits - plain).abs().max() > 100 * (got_logits - ours_logits).abs().max()
    config = json.loads((out / "adapter_config.json").read_text())
    rank = 12 if strategy == "flora" else 4   # FLoRA: the folded residual's 12 directions, as extra rank
    assert config["r"] == config["lora_alpha"] == rank




def test_export_carries_the_weights_the_checkpoint_lacked(bert_mlm_dir, tmp_path):
    from dataclasses import replace

    from fedlora.job.evaluate import load_scored_model
    from fedlora.job.schema import JobConfig
    from fedlora.job.setup import build_model
    from fedlora.models.adapter import read_adapter
    from fedlora.models.export import export_model
    from fedlora.tasks import get_task

    # Prepare: fedlora's model with its seeded random pooler, a random global adapter and head
    cfg = JobConfig(model=str(bert_mlm_dir), rank=4, seed=3)
    fm, _, path = build_model(cfg, [4], LORA, num_labels=3)
    state = _random_state(fm, "lora", torch.Generator().manual_seed(5))
    apply_global(fm, state, dict(state.merged))
    x = _inputs()
    want = fm(**x).logits
    # Execute: export; PEFT loads it onto a base whose pooler is drawn from another seed, and so do
    # fedlora-eval and --init-adapter
    out = export_model(fm, state, tmp_path / "adapter", path, "SEQ_CLS")
    torch.manual_seed(11)
    peft_model = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(bert_mlm_dir, num_labels=3), out).eval()
    scored = load_scored_model(replace(cfg, seed=11), get_task("classification"), read_adapter(out), 3)[0]
    init = build_model(replace(cfg, seed=11, init_adapter=str(out)), [4], LORA, num_labels=3)[0]
    again = export_model(init, state, tmp_path / "again", path, "SEQ_CLS")
    # Assert: the pooler is exported whole, never adapted, and every load has fedlora's logits
    assert fm.saved_modules == ["bert.pooler.dense"] and init.saved_modules == fm.saved_modules
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    assert "base_model.model.bert.pooler.dense.weight" in load_file(again / "adapter_model.safetensors")
    for got in (peft_model(**x).logits, scored(**x).logits, init(**x).logits):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_all_linear_leaves_out_the_weights_the_checkpoint_lacked(bert_mlm_dir):
    from fedlora.job.schema import JobConfig
    from fedlora.job.setup import build_model

    fm = build_model(JobConfig(model=str(bert_mlm_dir), target_modules=["all-linear"]), [2], LORA, 3)[0]
    assert fm.adapters and not any("pooler" in name for name in fm.adapters)
    with pytest.raises(UserError, match="--target-modules matches bert.pooler.dense, whose weights the"):
        build_model(JobConfig(model=str(bert_mlm_dir), target_modules=["query", "dense"]), [2], LORA, 3)


def test_a_regression_export_loads_with_one_label_and_is_refused_as_a_classifier(bert_mlm_dir, tmp_path):
    from dataclasses import replace

    from fedlora.job.evaluate import check_adapters, load_scored_model
    from fedlora.job.schema import JobConfig
    from fedlora.job.setup import build_model
    from fedlora.models.adapter import read_adapter
    from fedlora.models.export import TASK, export_model, read_task
    from fedlora.tasks import get_task

    # Prepare: a regression job's model (one output, no classes) with a random adapter and head
    cfg = JobConfig(task="regression", model=str(bert_mlm_dir), rank=4, seed=3)
    fm, _, path = build_model(cfg, [4], LORA, num_labels=0, labels=[])
    g = torch.Generator().manual_seed(6)
    state = replace(_random_state(fm, "lora", g), head={"classifier.weight": torch.randn(1, 32, generator=g),
                                                        "classifier.bias": torch.randn(1, generator=g)})
    apply_global(fm, state, dict(state.merged))
    x = _inputs()
    want = fm(**x).logits
    # Execute: export as a run does (its label names: none), load with PEFT onto a one-label base
    out = export_model(fm, state, tmp_path / "adapter", path, "SEQ_CLS", [], "regression")
    torch.manual_seed(11)
    base = AutoModelForSequenceClassification.from_pretrained(bert_mlm_dir, num_labels=1)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()(**x).logits
    scored = load_scored_model(replace(cfg, seed=11), get_task("regression"), read_adapter(out), 0)[0]
    scored = scored(**x).logits
    # Assert: fedlora's predictions, one per row; the task recorded, no label names
    assert want.shape == (4, 1)
    for got in (theirs, scored):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert read_task(out) == "regression" and read_labels(out) is None and not (out / LABELS).exists()
    # ... and scored as a classifier: refused by its record, or (an export without one) by its head
    classify = replace(cfg, task="classification")
    with pytest.raises(UserError, match=r"was trained by --task regression, whose head is not --task"
                                        r" classification's: score it with --task regression$"):
        check_adapters(classify, get_task("classification"), [out])
    (out / TASK).unlink()
    with pytest.raises(UserError, match=r"holds classifier.bias of shape \(1,\), not \(3,\), for"
                                        r" --task classification's head"):
        load_scored_model(classify, get_task("classification"), read_adapter(out), 3)
