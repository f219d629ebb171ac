"""Base models in 4 or 8 bits (``--quantize nf4|fp4|int8``): bitsandbytes ``Linear4bit`` /
``Linear8bitLt`` layers in place of the base's linear layers, through transformers'
``BitsAndBytesConfig``. The output (LM) head and a classification head are skipped, so they stay in
the load dtype; what the adapters add to a quantized layer is :mod:`fedlora.models.lora`'s.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from fedlora.errors import UserError
from fedlora.models.lora import is_quantized
from fedlora.models.model import HEAD_NAMES
from fedlora.models.quiet import import_bitsandbytes

QUANTIZE = ("none", "nf4", "fp4", "int8")
BNB_PIN = "bitsandbytes==0.50.2"
#: Heads that are never quantized (with the model's output embeddings): the classification heads.
UNQUANTIZED_HEADS = HEAD_NAMES


def require_bitsandbytes(quantize: str) -> None:
    """Refuse ``--quantize`` without bitsandbytes installed, in one line."""
    if quantize != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"--quantize {quantize} needs bitsandbytes: pip install {BNB_PIN}"
                        " (or pip install -e '.[llm]')")


def quantize_skips(path: Path, auto_class, **kwargs) -> list[str]:
    """Names of the modules ``--quantize`` skips: the output embeddings and the classification head
    (found on a weightless copy of the model, on the meta device)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False, **kwargs)
    with torch.device("meta"):
        model = auto_class.from_config(config)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in model.named_modules() if output is not None and m is output}
    return sorted(names | set(UNQUANTIZED_HEADS))


def quantization_config(quantize: str, double_quant: bool, dtype: torch.dtype, skip: list[str]):
    """transformers' ``BitsAndBytesConfig`` for ``--quantize`` (None for ``none``): 4-bit NF4/FP4
    blocks computed in ``dtype`` (bf16 with ``--precision bf16``, else fp32), or 8-bit."""
    if quantize == "none":
        return None
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown --quantize {quantize!r}; use one of {', '.join(QUANTIZE)}")
    require_bitsandbytes(quantize)
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=skip)


def check_quantized(model: nn.Module, name: str, quantize: str) -> None:
    """Refuse a model bitsandbytes replaced no layer of; keep every ``Linear4bit`` on the
    differentiable path (bitsandbytes repacks the weight of a CPU layer in eval mode for a
    faster, but non-differentiable, kernel: fedlora keeps the base in eval mode while training)."""
    quantized = [m for m in model.modules() if is_quantized(m)]
    if not quantized:
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if isinstance(m, nn.Linear) and type(m) is not nn.Linear})
        why = (f"; its layers are {', '.join(kinds)}, subclasses of nn.Linear that transformers' loader"
               " leaves unquantized" if kinds else "")
        raise UserError(f"--quantize {quantize}: bitsandbytes replaced no linear layer of {name}"
                        f" (it quantizes nn.Linear layers but the heads{why}): drop --quantize")
    for m in quantized:
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
