"""How many tokens a model takes: its positions, less those before its first token, or its
tokenizer's limit (``--max-length``'s ceiling)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedlora.models.quiet import quiet


def position_offset(model: nn.Module) -> int:
    """The positions a model's learned position embeddings hold before its first token's: ``padding_idx
    + 1`` where they have a padding index (RoBERTa, XLM-R, MPNet, ESM, Longformer: position ids start
    after the pad's, so 514 positions hold 512 tokens), else 0."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.Embedding) and "position" in name.rpartition(".")[2]
                and module.padding_idx is not None):
            return int(module.padding_idx) + 1
    return 0


def _config_offset(config) -> int:
    """:func:`position_offset` of a weightless copy (meta device) of the model ``config`` describes; 0
    where transformers builds no model from it."""
    from transformers import AutoModel

    try:
        with quiet(), torch.device("meta"):
            return position_offset(AutoModel.from_config(config))
    except Exception:  # noqa: BLE001 - a config transformers maps to no base model
        return 0


def context_length(config, tokenizer, model: nn.Module | None = None) -> int | None:
    """The tokens a model takes: its config's ``max_position_embeddings`` less its
    :func:`position_offset` (read from ``model``, or from a weightless copy built from ``config``), or
    its tokenizer's ``model_max_length`` when smaller; None when neither says (a tokenizer without a
    limit has a huge ``model_max_length``)."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        positions -= position_offset(model) if model is not None else _config_offset(config)
    limits = [positions, getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None


def tokenizer_context(tokenizer) -> int | None:
    """:func:`context_length` of the model whose folder ``tokenizer`` was read from (its
    ``config.json``), or of the tokenizer alone where that folder has no config."""
    from transformers import AutoConfig

    folder, config = Path(getattr(tokenizer, "name_or_path", "") or "."), None
    if (folder / "config.json").is_file():
        with quiet():
            try:
                config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError):
                config = None
    return context_length(config, tokenizer)
