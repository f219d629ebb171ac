"""Flower wire format: named tensors <-> ``ArrayRecord``, and the bytes Flower ships.

Flower serialises an ``ArrayRecord`` as a tree of content-addressed objects: the
record (a JSON map of names to array ids), one object per array (its ``.npy``
metadata), and the array's bytes in chunks of at most 5 MiB; the SuperLink and
SuperNode move each object with its own HTTP request. A LoRA upload has 2 tensors
per adapted layer (~50 for MiniLM), and a coded one (``--compress``) tensors of
three dtypes, so :func:`to_record` ships two arrays whatever the message holds:

* ``data`` (uint8): every tensor's bytes (C order, little-endian), one after another;
* ``index`` (uint8): the zlib-compressed JSON list of ``[name, dtype, shape, offset]``
  (``dtype`` as numpy's ``'<f4'`` string, ``offset`` in bytes into ``data``).

Tensor names repeat their module paths (``model.layers.3.self_attn.q_proj.lora_A``), so
the JSON compresses about 7×; uncompressed, the index of a Fed-SB upload (24 r × r cores)
was as large as its int8 codes.

:func:`wire_bytes` adds up the serialised size of every distinct object of that
tree, so it counts the ``.npy`` headers, the index, names and chunk headers, not
just ``4 × numel``.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import torch
from torch import Tensor

INDEX = "index"
DATA = "data"


def record_index(tensors: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """``(the compressed index, the data's length in bytes)`` of :func:`to_record`'s record of
    ``tensors`` (numpy arrays, or anything with ``dtype``, ``shape`` and ``nbytes``)."""
    index, offset = [], 0
    for name, arr in tensors.items():
        index.append([name, arr.dtype.newbyteorder("<").str, list(arr.shape), offset])  # as shipped
        offset += arr.nbytes
    return zlib.compress(json.dumps(index).encode(), 9), offset


def to_record(tensors: dict[str, Tensor]):
    """An ``ArrayRecord`` holding ``tensors``' bytes in one array, plus the index (CPU)."""
    from flwr.app import Array, ArrayRecord

    arrays = {name: t.detach().cpu().contiguous().numpy() for name, t in tensors.items()}
    index, _ = record_index(arrays)
    raw = [np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)).reshape(-1).view(np.uint8)
           for a in arrays.values()]
    data = np.concatenate(raw) if raw else np.zeros(0, dtype=np.uint8)  # the one copy of the bytes
    return ArrayRecord({INDEX: Array(np.frombuffer(index, dtype=np.uint8).copy()), DATA: Array(data)})


def from_record(record) -> dict[str, Tensor]:
    """Named tensors of an ``ArrayRecord`` made by :func:`to_record`.

    Raises ``ValueError`` (naming the problem) for a malformed record.
    """
    for key in (INDEX, DATA):
        if key not in record:
            raise ValueError(f"record has no '{key}' array")
    try:
        index = json.loads(zlib.decompress(record[INDEX].numpy().astype(np.uint8).tobytes()).decode())
        data = np.ascontiguousarray(record[DATA].numpy(), dtype=np.uint8)
        out = {}
        for name, dt, shape, offset in index:
            dtype = np.dtype(dt)
            n = int(np.prod(shape)) if shape else 1
            if offset < 0 or offset + n * dtype.itemsize > data.size:
                raise ValueError(f"tensor {name!r} lies outside its data array")
            arr = np.frombuffer(data, dtype=dtype, count=n, offset=offset).astype(dtype.newbyteorder("="))
            out[name] = torch.from_numpy(arr.reshape(shape))
        return out
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError, zlib.error) as exc:
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


def array_bytes(content) -> int:
    """:func:`wire_bytes` of every array record of a message's ``content`` (a ``RecordDict``)."""
    return sum(wire_bytes(r) for r in content.array_records.values())


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    """:func:`wire_bytes` of the record Flower would ship for ``tensors`` (0 if empty)."""
    return wire_bytes(to_record(tensors)) if tensors else 0
