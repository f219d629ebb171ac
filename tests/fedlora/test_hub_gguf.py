"""--model x.gguf beyond SmolLM2: tiny GGUF files of other tensor types, tokenizers and metadata
(:mod:`tests.fedlora.gguf_files`), dequantized into the cache, or refused in one line."""

from __future__ import annotations

import pytest
import torch

from fedlora.errors import UserError
from fedlora.models.hub import load_model, resolve_model_path
from tests.fedlora.gguf_files import sp_fields, tiny_llama, write_llama_gguf
from tests.fedlora.sp_tokenizers import LLAMA2_TEMPLATE

pytest.importorskip("gguf")

IDS = torch.tensor([[1, 50, 60, 70, 2]])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty fedlora cache of this test (``FEDLORA_CACHE_DIR``)."""
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.mark.parametrize("tied", [True, False])
def test_a_gguf_loads_as_the_model_it_was_written_from(tied, cache, tmp_path):
    # Prepare: a tiny LLaMA, its head tied to the embeddings or its own (an output.weight tensor)
    model = tiny_llama(tie_word_embeddings=tied)
    path = write_llama_gguf(tmp_path / "tiny.gguf", model)
    # Execute: fedlora's load of the file (dequantized into the cache)
    loaded, tok, folder, _ = load_model(str(path), "causal-lm")
    # Assert: the same logits, the head as the file has it, the file's special tokens
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)
    head, embeddings = loaded.get_output_embeddings().weight, loaded.get_input_embeddings().weight
    assert (head.data_ptr() == embeddings.data_ptr()) is tied and loaded.dtype == torch.float32
    assert folder.parent == cache and (tok.bos_token, tok.eos_token) == ("<s>", "</s>")


def test_a_gguf_whose_tensors_do_not_fit_its_metadata_is_refused_naming_the_tensor(cache, tmp_path):
    # Prepare: the metadata's feed-forward width (256) is not its tensors' (128), as a file whose
    # shapes transformers' reader does not take (Qwen3's head_dim, GPT-2's n_positions) reads
    wide = write_llama_gguf(tmp_path / "wide.gguf", extra={"llama.feed_forward_length": 256})
    # Execute, Assert: refused in one line naming the first tensor and both shapes; nothing cached
    with pytest.raises(UserError, match=r"^transformers cannot load wide\.gguf: transformers' 'llama'"
                       r" model built from its metadata has model\.layers\.0\.mlp\.down_proj\.weight of"
                       r" shape 64×256, the file.s is 64×128 \(6 tensors differ\); transformers"):
        resolve_model_path(str(wide))
    assert not cache.exists() or not any(cache.iterdir())


def test_a_gguf_without_a_tensor_of_its_model_is_refused_not_drawn_at_random(cache, tmp_path):
    # Prepare: a file without block 1's down projection
    short = write_llama_gguf(tmp_path / "short.gguf", skip=("blk.1.ffn_down.weight",))
    # Execute, Assert: refused in one line naming it (transformers would have drawn it at random)
    with pytest.raises(UserError, match=r"^transformers cannot load short\.gguf: .* has"
                       r" model\.layers\.1\.mlp\.down_proj\.weight, which the file lacks \(1 missing"):
        resolve_model_path(str(short))


def test_planning_a_gguf_reads_its_tokenizer_from_the_file_without_dequantizing_it(cache, tmp_path, capsys):
    # Prepare: a tiny GGUF and instruction data; no --max-length, so the plan reads it from the data
    import json

    from fedlora.models.hub import read_tokenizer_config
    from fedlora.plan.cli import main

    path = write_llama_gguf(tmp_path / "tiny.gguf", fields=sp_fields(LLAMA2_TEMPLATE))
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the capital of france", "response": "paris"}) + "\n"
                            for _ in range(8)))
    # Execute: the plan, and the tokenizer read, before and after the file is dequantized
    assert main(["--model", str(path), "--task", "sft", "--data", str(data)]) == 0
    planned = capsys.readouterr().err
    assert not cache.exists()   # nothing dequantized
    before, config = read_tokenizer_config(str(path))
    resolve_model_path(str(path))
    after, _ = read_tokenizer_config(str(path))
    # Assert: --max-length from the data (said in the plan's one line); the file's tokenizer encodes
    # and pads as the dequantized folder's does
    assert planned.startswith("fedlora: --max-length 24 (")
    assert config.num_hidden_layers == 2 and before.padding_side == after.padding_side == "right"
    text = "what is the capital of france? paris"
    assert before(text).input_ids == after(text).input_ids and before(text).input_ids[0] == 1


@pytest.mark.parametrize("kind, fields", [
    ("linear", {"factor": 4.0}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0, "beta_slow": 2.0})])
def test_a_gguf_keeps_the_rope_scaling_its_metadata_declares(kind, fields, cache, tmp_path):
    # Prepare: a LLaMA whose rotary positions are scaled, written as llama.cpp's converter writes it
    names = {"factor": "factor", "original_max_position_embeddings": "original_context_length",
             "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow"}
    model = tiny_llama(rope_parameters={"rope_type": kind, "rope_theta": 10000.0, **fields})
    extra = {"llama.rope.scaling.type": kind,
             **{f"llama.rope.scaling.{names[k]}": v for k, v in fields.items()}}
    path = write_llama_gguf(tmp_path / f"{kind}.gguf", model, extra=extra)
    # Execute: fedlora's load of the file
    loaded, *_ = load_model(str(path), "causal-lm")
    # Assert: the scaled model's logits (transformers' reader alone loads it unscaled: other logits)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)
        assert not torch.allclose(tiny_llama()(IDS).logits, model(IDS).logits, atol=1e-3)
    assert loaded.config.rope_parameters == {"rope_type": kind, "rope_theta": 10000.0, **fields}


def test_a_gguf_with_llama3_rope_frequencies_keeps_them(cache, tmp_path):
    # Prepare: a LLaMA-3.1-style model (factor 8, low and high frequency factors 1 and 4, 8,192
    # original positions) and its rope_freqs as llama.cpp's converter computes them: head dim 16,
    # wavelengths 2π·10000^(i/16) for i = 0, 2, ..., 14: those under 8192/4 keep 1, 19,869 > 8192
    # takes the factor 8, and 6,283 between takes 1 / ((1 - s)/8 + s), s = (8192/6283 - 1)/(4 - 1)
    import math

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    model = tiny_llama(rope_parameters={**llama3, "rope_theta": 10000.0})
    smooth = (8192 / (2 * math.pi * 10000 ** (12 / 16)) - 1) / 3
    factors = [1.0] * 6 + [1 / ((1 - smooth) / 8 + smooth), 8.0]
    path = write_llama_gguf(tmp_path / "llama3.gguf", model, tensors={"rope_freqs.weight": factors})
    # Execute: fedlora's load
    loaded, *_ = load_model(str(path), "causal-lm")
    # Assert: LLaMA-3's rope, and its model's logits
    assert loaded.config.rope_parameters == {**llama3, "rope_theta": 10000.0}
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)


def test_a_cached_llama3_gguf_loads_without_the_gguf_package(cache, tmp_path, monkeypatch):
    # Prepare: a LLaMA-3.1-style file (its rope_freqs as above) dequantized into the cache; then the
    # gguf package gone (a machine sharing the cache, which needs neither gguf nor accelerate)
    import math
    import sys

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    smooth = (8192 / (2 * math.pi * 10000 ** (12 / 16)) - 1) / 3
    factors = [1.0] * 6 + [1 / ((1 - smooth) / 8 + smooth), 8.0]
    model = tiny_llama(rope_parameters={**llama3, "rope_theta": 10000.0})
    path = write_llama_gguf(tmp_path / "llama3.gguf", model, tensors={"rope_freqs.weight": factors})
    folder = resolve_model_path(str(path))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf: ImportError
    # Execute: the load of the cached folder (it raised ModuleNotFoundError: reading the file's rope_freqs)
    assert resolve_model_path(str(path)) == folder
    loaded, *_ = load_model(str(path), "causal-lm")
    # Assert: LLaMA-3's rope, as cached
    assert loaded.config.rope_parameters == {**llama3, "rope_theta": 10000.0}


def test_a_gguf_with_per_frequency_rope_factors_says_they_are_not_read(cache, tmp_path, capsys):
    # Prepare: a rope_freqs tensor (one factor per frequency) that LLaMA-3's parameters do not give
    path = write_llama_gguf(tmp_path / "llama3.gguf", tensors={"rope_freqs.weight": [1.0] * 4 + [8.0] * 4})
    # Execute: the load
    resolve_model_path(str(path))
    # Assert: one line says the model is loaded without them
    assert ("fedlora: llama3.gguf scales its rotary positions (tensors rope_freqs), which transformers' GGUF"
            " reader does not read: the model is loaded without it") in capsys.readouterr().err


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    # Prepare: FEDLORA_CACHE_DIR names a file, as a cache on a full or read-only disk fails to write
    path = write_llama_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "cache"))
    # Execute, Assert: refused in one line saying where and what room it needs (the tiny model's fp32
    # weights take under 1 MB: 0.0 GB)
    with pytest.raises(UserError, match=r"^cannot cache tiny\.gguf dequantized in '.*/cache/models' \(.*Not a"
                       r" directory.*\): set FEDLORA_CACHE_DIR to a writable folder with 0\.0 GB free$"):
        resolve_model_path(str(path))


@pytest.mark.parametrize("left", ["stray", "earlier"])
def test_a_cache_folder_not_marked_whole_by_this_fedlora_is_redone(left, cache, tmp_path):
    # Prepare: the file's cache folder holds a stray file and no config.json, or what an earlier fedlora
    # cached there (a config.json, no fedlora_gguf.json: here a wrong one), which may lack what this one
    # reads from the file (rope scaling) or hold fp16 weights
    import json

    from fedlora.models.gguf_cache import gguf_cache

    path = write_llama_gguf(tmp_path / "tiny.gguf")
    folder = gguf_cache(path)
    folder.mkdir(parents=True)
    (folder / ("model.safetensors.tmp" if left == "stray" else "config.json")).write_text("{}")
    # Execute: the load
    assert resolve_model_path(str(path)) == folder
    # Assert: the folder is the dequantized model's, whole and marked so
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert json.loads((folder / "fedlora_gguf.json").read_text()) == {"format": 2, "gguf": "tiny.gguf"}
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and "model.safetensors.tmp" not in names
    assert [p.name for p in cache.iterdir()] == [folder.name]


def test_an_f16_gguf_of_transformers_newer_reader_is_cached_in_fp32_with_its_fp32_norms(cache, tmp_path):
    # Prepare: an LFM2 (read by transformers' newer GGUF reader, which loads a file in its own float
    # type) with F16 matrices and F32 norms, as llama.cpp writes an F16 file
    from transformers import AutoModelForCausalLM

    from tests.fedlora.gguf_files import write_lfm2_gguf

    model, path = write_lfm2_gguf(tmp_path / "lfm2.gguf", "F16")
    # Execute: the load, and a plain transformers load of the cached folder (the base a PEFT load names)
    folder = resolve_model_path(str(path))
    plain = AutoModelForCausalLM.from_pretrained(folder)
    # Assert: fp32, the norms exactly the file's, the matrices within F16's rounding
    assert plain.dtype == torch.float32 and type(plain).__name__ == "Lfm2ForCausalLM"
    assert torch.equal(plain.model.embedding_norm.weight, model.model.embedding_norm.weight)
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, model(IDS).logits, atol=2e-3, rtol=0)
