"""Tiny GGUF files written in this process with the ``gguf`` package: a random-init LLaMA (or another
architecture transformers' GGUF reader takes) with a SentencePiece ("llama") tokenizer of about 400
tokens (:func:`tests.fedlora.sp_tokenizers.llama2_tokenizer`'s vocabulary), as llama.cpp's converter
lays one out: q and k rows permuted, the tokenizer in ``tokenizer.ggml.*`` metadata."""

from __future__ import annotations

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
    from gguf import GGMLQuantizationType, GGUFWriter, get_tensor_name_map, quants
    from gguf.constants import MODEL_ARCH

    model = model if model is not None else tiny_llama()
    conf, kind = model.config.to_dict(), GGMLQuantizationType[qtype]
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
        if w.ndim == 2 and kind == GGMLQuantizationType.F16:
            writer.add_tensor(name, w.astype(np.float16))
        elif w.ndim == 2 and kind != GGMLQuantizationType.F32:
            packed = quants.quantize(np.ascontiguousarray(w), kind)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w))
    for name, value in (tensors or {}).items():
        writer.add_tensor(name, np.asarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
