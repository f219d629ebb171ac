"""Batched per-client adapter ops (torch only), each beside a slow reference."""

from . import per_sample
from .dropout import dropout_mask, lora_dropout, row_keys, subrow_keys
from .lora_ops import (
    Routing,
    dense_delta,
    dense_delta_reference,
    lora_delta,
    lora_delta_reference,
    sb_delta,
    sb_delta_reference,
)

__all__ = [
    "Routing",
    "per_sample",
    "dropout_mask",
    "lora_dropout",
    "row_keys",
    "subrow_keys",
    "dense_delta",
    "dense_delta_reference",
    "lora_delta",
    "lora_delta_reference",
    "sb_delta",
    "sb_delta_reference",
]
