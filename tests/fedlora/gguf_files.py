"""Tiny GGUF files written in this process with the ``gguf`` package: a random-init LLaMA (or another
architecture transformers' GGUF reader takes) with a SentencePiece ("llama") tokenizer of about 400
tokens (:func:`tests.fedlora.sp_tokenizers.llama2_tokenizer`'s vocabulary), as llama.cpp's converter
lays one out: q and k rows permuted, the tokenizer in ``tokenizer.ggml.*`` metadata."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from tests.fedlora.sp_tokenizers import llama2_tokenizer

#: The tiny model's shape: 2 blocks, 64 wide (every quantization type's block of 32 fits a row).
SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "max_position_embeddings": 256}
#: The LLaMA metadata keys llama.cpp writes and the config fields they hold.
LLAMA_KEYS = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
              "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
              "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
              "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size"}


def sp_fields(template: str | None = None) -> dict:
    """The ``tokenizer.*`` metadata of the tiny SentencePiece tokenizer (``<s>`` added before a text)."""
    vocab = llama2_tokenizer(None).get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    kinds = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x") else 1
             for t in tokens]
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.scores": [float(-i) for i in range(len(tokens))],
              "tokenizer.ggml.token_type": kinds,
              "tokenizer.ggml.bos_token_id": vocab["<s>"], "tokenizer.ggml.eos_token_id": vocab["</s>"],
              "tokenizer.ggml.unknown_token_id": vocab["<unk>"], "tokenizer.ggml.add_bos_token": True}
    if template is not None:
        fields["tokenizer.chat_template"] = template
    return fields


def tiny_llama(seed: int = 0, **config):
    """A random-init ``LlamaForCausalLM`` of :data:`SHAPE` (or as ``config`` says), the tiny vocabulary's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(sp_fields()["tokenizer.ggml.tokens"])
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **{**SHAPE, **config})).eval()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a q or k weight (transformers' reader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def write_llama_gguf(path: Path, model=None, arch: str = "llama", qtype: str = "F32",
                     fields: dict | None = None, extra: dict | None = None, tensors: dict | None = None,
                     skip: tuple = ()) -> Path:
    """Write ``model`` (default :func:`tiny_llama`) to ``path`` as a GGUF file of architecture ``arch``
    (its metadata keys named so), 2-D weights stored as ``qtype`` (``F32``, ``F16``, ``Q8_0``, ...),
    the tokenizer ``fields`` (default :func:`sp_fields`), ``extra`` metadata (replacing the model's where
    named alike) and ``tensors`` besides, leaving out the tensors named in ``skip``."""
    from gguf import GGUFWriter, get_tensor_name_map
    from gguf.constants import MODEL_ARCH

    model = model if model is not None else tiny_llama()
    conf = model.config.to_dict()
    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    keys = {f"{arch}.{key}": conf[attr] for key, attr in LLAMA_KEYS.items()}
    for key, value in {**keys, **(fields if fields is not None else sp_fields()), **(extra or {})}.items():
        _add(writer, key, value)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, conf["num_hidden_layers"])
    tied = {"lm_head.weight"} if conf["tie_word_embeddings"] else set()
    for hf, value in model.state_dict().items():
        if hf in tied:
            continue
        name = names.get_name(hf.rsplit(".", 1)[0]) + ".weight"
        if name in skip:
            continue
        w = value.float().numpy()
        if ".attn_q." in name or ".attn_k." in name:
            heads = conf["num_attention_heads"] if ".attn_q." in name else conf["num_key_value_heads"]
            w = _permute(w, heads)
        _tensor(writer, name, w, qtype)
    for name, value in (tensors or {}).items():
        writer.add_tensor(name, np.asarray(value, dtype=np.float32))
    return _close(writer, path)


def _tensor(writer, name: str, w: np.ndarray, qtype: str) -> None:
    """Add weight ``w``: a matrix stored as ``qtype``, a vector (a norm) as F32, as llama.cpp stores them."""
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType[qtype]
    if w.ndim == 2 and kind == GGMLQuantizationType.F16:
        writer.add_tensor(name, w.astype(np.float16))
    elif w.ndim == 2 and kind != GGMLQuantizationType.F32:
        packed = quants.quantize(np.ascontiguousarray(w), kind)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
    else:
        writer.add_tensor(name, np.ascontiguousarray(w))


def _close(writer, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


#: transformers' names of an LFM2's tensors and llama.cpp's (transformers' newer GGUF reader takes it).
LFM2_NAMES = [(r"^model\.embed_tokens\.", "token_embd."), (r"^model\.embedding_norm\.", "token_embd_norm."),
              (r"^model\.layers\.", "blk."), (r"\.operator_norm\.", ".attn_norm."),
              (r"\.self_attn\.q_proj\.", ".attn_q."),
              (r"\.self_attn\.k_proj\.", ".attn_k."), (r"\.self_attn\.v_proj\.", ".attn_v."),
              (r"\.self_attn\.out_proj\.", ".attn_output."), (r"\.self_attn\.q_layernorm\.", ".attn_q_norm."),
              (r"\.self_attn\.k_layernorm\.", ".attn_k_norm."), (r"\.feed_forward\.w1\.", ".ffn_gate."),
              (r"\.feed_forward\.w3\.", ".ffn_up."), (r"\.feed_forward\.w2\.", ".ffn_down."),
              (r"\.conv\.(in_proj|out_proj|conv)\.", r".shortconv.\1.")]


def write_lfm2_gguf(path: Path, qtype: str = "F16"):
    """``(model, path)``: a random-init 2-block LFM2 (a convolution block, then attention), its head
    tied, written to ``path`` with the tiny SentencePiece tokenizer, matrices as ``qtype``."""
    import re

    from gguf import GGUFWriter
    from transformers import Lfm2Config, Lfm2ForCausalLM

    fields = sp_fields()
    config = Lfm2Config(vocab_size=len(fields["tokenizer.ggml.tokens"]), hidden_size=64,
                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, layer_types=["conv", "full_attention"],
                        max_position_embeddings=256, block_auto_adjust_ff_dim=False, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Lfm2ForCausalLM(config).eval()
    writer = GGUFWriter(str(path), "lfm2")
    keys = {"context_length": 256, "embedding_length": 64, "feed_forward_length": 128, "block_count": 2,
            "attention.head_count": 4, "attention.head_count_kv": [0, 2],
            "shortconv.l_cache": config.conv_L_cache, "attention.layer_norm_rms_epsilon": config.norm_eps,
            "rope.freq_base": config.rope_parameters["rope_theta"]}
    for key, value in {**{f"lfm2.{k}": v for k, v in keys.items()}, **fields}.items():
        _add(writer, key, value)
    for hf, value in model.state_dict().items():
        if hf != "lm_head.weight":
            name = functools.reduce(lambda n, rule: re.sub(*rule, n), LFM2_NAMES, hf)
            w = value.float().numpy()
            _tensor(writer, name, w.squeeze(1) if name.endswith("shortconv.conv.weight") else w, qtype)
    return model, _close(writer, path)
