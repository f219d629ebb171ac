"""Flower wire format: named tensors <-> ``ArrayRecord``, and the bytes Flower ships.

Flower serialises an ``ArrayRecord`` as a tree of content-addressed objects: the
record (a JSON map of names to array ids), one object per array (its ``.npy``
metadata), and the array's bytes in chunks of at most 5 MiB; the SuperLink and
SuperNode move each object with its own HTTP request. A LoRA upload has 2 tensors
per adapted layer (~50 for MiniLM), so :func:`to_record` packs the tensors of one
dtype into a single flat array (``data.float32``) and their names, dtypes, shapes
and offsets into a small JSON index (``index``, uint8): a handful of objects per
message instead of ~150, which is most of a round's transfer time on loopback.

:func:`wire_bytes` adds up the serialised size of every distinct object of that
tree, so it counts the ``.npy`` headers, the index, names and chunk headers, not
just ``4 × numel``.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import Tensor

INDEX = "index"


def to_record(tensors: dict[str, Tensor]):
    """An ``ArrayRecord`` holding ``tensors`` packed per dtype, plus the index (CPU)."""
    from flwr.app import Array, ArrayRecord

    index, chunks, offsets = [], {}, {}
    for name, t in tensors.items():
        arr = t.detach().cpu().contiguous().numpy()
        dt = arr.dtype.name
        index.append([name, dt, list(arr.shape), offsets.get(dt, 0)])
        chunks.setdefault(dt, []).append(arr.reshape(-1))
        offsets[dt] = offsets.get(dt, 0) + arr.size
    arrays = {INDEX: Array(np.frombuffer(json.dumps(index).encode(), dtype=np.uint8).copy())}
    for dt, parts in chunks.items():
        arrays[f"data.{dt}"] = Array(np.concatenate(parts))
    return ArrayRecord(arrays)


def from_record(record) -> dict[str, Tensor]:
    """Named tensors of an ``ArrayRecord`` made by :func:`to_record`.

    Raises ``ValueError`` (naming the problem) for a malformed record.
    """
    if INDEX not in record:
        raise ValueError(f"record has no '{INDEX}' array")
    try:
        index = json.loads(bytes(record[INDEX].numpy().astype(np.uint8)).decode())
        data = {k[5:]: record[k].numpy() for k in record.keys() if k.startswith("data.")}
        out = {}
        for name, dt, shape, offset in index:
            n = int(np.prod(shape)) if shape else 1
            flat = data[dt]
            if offset < 0 or offset + n > flat.size:
                raise ValueError(f"tensor {name!r} lies outside its data array")
            out[name] = torch.from_numpy(np.array(flat[offset:offset + n], copy=True).reshape(shape))
        return out
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"record index is malformed ({type(exc).__name__}: {exc})") from None


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
