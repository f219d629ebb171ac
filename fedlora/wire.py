"""Flower wire format: named tensors <-> ``ArrayRecord``, and the bytes Flower ships.

Flower serialises an ``ArrayRecord`` as a tree of content-addressed objects: the
record (a JSON map of names to array ids), one object per array (its ``.npy``
metadata), and the array's bytes in chunks of at most 5 MiB. :func:`wire_bytes`
adds up the serialised size of every distinct object of that tree, so it counts the
``.npy`` headers, names and chunk headers, not just ``4 × numel``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_record(tensors: dict[str, Tensor]):
    """An ``ArrayRecord`` holding ``tensors`` as float32/int64 numpy arrays (CPU)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy()))
                        for k, v in tensors.items()})


def from_record(record) -> dict[str, Tensor]:
    """Named tensors of an ``ArrayRecord``."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def wire_bytes(record) -> int:
    """Serialised bytes of every distinct object in the record's tree."""
    seen: set[str] = set()

    def walk(obj) -> int:
        oid = obj.object_id
        if oid in seen:
            return 0
        seen.add(oid)
        total = len(obj.deflate())
        for child in (obj.children or {}).values():
            total += walk(child)
        return total

    return walk(record)


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    """:func:`wire_bytes` of the record Flower would ship for ``tensors`` (0 if empty)."""
    return wire_bytes(to_record(tensors)) if tensors else 0
