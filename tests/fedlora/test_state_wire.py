"""Uploads and downloads as named tensors, Flower ArrayRecords, and their byte counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.models.state import download_tensors, upload_from_tensors, upload_tensors
from fedlora.rounds.wire import from_record, tensor_bytes, to_record, wire_bytes
from fedlora.strategies import ClientUpload, GlobalState
from fedlora.strategies.fed_sb import FedSB
from fedlora.strategies.flora import FLoRA
from fedlora.strategies.plan import LORA


def _upload() -> ClientUpload:
    g = torch.Generator().manual_seed(0)
    return ClientUpload(
        num_examples=7, scale=2.0,
        factors={"l0.q": (torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g))},
        head={"classifier.weight": torch.randn(4, 5, generator=g),
              "classifier.bias": torch.randn(4, generator=g)})


def test_upload_roundtrip_through_array_record():
    # Prepare
    up = _upload()
    # Execute: flatten, pack into an ArrayRecord, unpack, rebuild
    back = upload_from_tensors(from_record(to_record(upload_tensors(up, LORA))), 7, 2.0, LORA)
    # Assert: identical tensors under the same names
    assert set(upload_tensors(up, LORA)) == {"l0.q.lora_A", "l0.q.lora_B", "head.classifier.weight",
                                       "head.classifier.bias"}
    assert torch.equal(back.factors["l0.q"][0], up.factors["l0.q"][0])
    assert torch.equal(back.factors["l0.q"][1], up.factors["l0.q"][1])
    assert torch.equal(back.head["classifier.bias"], up.head["classifier.bias"])


def test_unknown_upload_key_is_rejected_by_name():
    with pytest.raises(ValueError, match="unexpected tensor 'l0.q.weird'"):
        upload_from_tensors({"l0.q.weird": torch.zeros(1)}, 1, 1.0, LORA)


def test_wire_bytes_counts_npy_payload_names_and_headers():
    # Prepare: one float32 array of 1000 numbers: 4000 bytes of data plus .npy header
    t = {"w": torch.zeros(1000)}
    record = to_record(t)
    npy = len(record["data"].data)
    index = len(record["index"].data)
    # Execute
    n = wire_bytes(record)
    # Assert: at least the .npy bytes (4000 + its 128-byte header) and the index, at most ~1 KiB more
    assert sorted(record.keys()) == ["data", "index"]
    assert npy == 4000 + 128
    assert npy + index < n < npy + index + 1024
    assert tensor_bytes(t) == n and tensor_bytes({}) == 0


def test_the_index_is_compressed_json_of_names_dtypes_shapes_and_byte_offsets():
    # Prepare: module-path names that repeat, as an upload's do
    import json
    import zlib

    t = {f"model.layers.{i}.self_attn.q_proj.lora_{k}": torch.ones(2, 3, dtype=dt)
         for i in range(20) for k, dt in (("A", torch.float32), ("B", torch.int8))}
    # Execute
    raw = bytes(to_record(t)["index"].numpy())
    index = json.loads(zlib.decompress(raw))
    # Assert: one entry a tensor, offsets in bytes (24 bytes of float32, then 6 of int8, ...)
    assert index[:3] == [["model.layers.0.self_attn.q_proj.lora_A", "<f4", [2, 3], 0],
                         ["model.layers.0.self_attn.q_proj.lora_B", "|i1", [2, 3], 24],
                         ["model.layers.1.self_attn.q_proj.lora_A", "<f4", [2, 3], 30]]
    assert len(raw) * 4 < len(json.dumps(index))


def test_packed_record_keeps_names_shapes_dtypes_and_order():
    # Prepare: tensors of two dtypes and several shapes, including a scalar
    t = {"b": torch.arange(6.0).view(2, 3), "a": torch.tensor(2.5), "i": torch.arange(3),
         "c": torch.ones(4, 1)}
    # Execute
    record = to_record(t)
    back = from_record(record)
    # Assert: one byte array for every dtype, plus the index; every tensor comes back exactly
    assert set(record.keys()) == {"index", "data"}
    assert list(back) == ["b", "a", "i", "c"]
    for k, v in t.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_malformed_record_is_refused_by_name():
    import numpy as np
    from flwr.app import Array, ArrayRecord

    with pytest.raises(ValueError, match="no 'index'"):
        from_record(ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}))
    bad = to_record({"w": torch.zeros(3)})
    bad["data"] = Array(np.zeros(8, dtype=np.uint8))  # 2 of the 3 float32 numbers
    with pytest.raises(ValueError, match="outside its data array"):
        from_record(bad)
    bad["index"] = Array(np.frombuffer(b"[not zlib]", dtype=np.uint8).copy())
    with pytest.raises(ValueError, match="record index is malformed"):
        from_record(bad)


def test_wire_bytes_grow_with_payload_exactly_by_data_size():
    # Prepare: same shape rank, 10x the numbers
    small, big = tensor_bytes({"w": torch.ones(100, 10)}), tensor_bytes({"w": torch.ones(1000, 10)})
    # Assert: the difference is exactly the extra 9000 float32 numbers (plus shape digits)
    assert 36000 <= big - small <= 36000 + 4


def test_download_contents_per_strategy_kind():
    g = torch.Generator().manual_seed(1)
    A, B, R = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g), torch.eye(2)
    head = {"classifier.bias": torch.zeros(4)}
    # FedAvg-like: the global factors and head
    lora = download_tensors(GlobalState(factors={"l": (A, B)}, head=head), {}, LORA, first=True)
    assert set(lora) == {"l.lora_A", "l.lora_B", "head.classifier.bias"}
    # FLoRA: the stack to fold, no adapter
    flora = download_tensors(GlobalState(head=head), {"l": (A, B)}, FLoRA.adapter_plan, first=False)
    assert set(flora) == {"l.fold_A", "l.fold_B", "head.classifier.bias"}
    # Fed-SB: R every round, the frozen A and B only the first time
    sb = GlobalState(factors={"l": (A, B)}, cores={"l": R}, head=head)
    first = download_tensors(sb, {}, FedSB.adapter_plan, first=True)
    assert set(first) == {"l.lora_R", "l.lora_A", "l.lora_B", "head.classifier.bias"}
    assert set(download_tensors(sb, {}, FedSB.adapter_plan, first=False)) == {"l.lora_R",
                                                                             "head.classifier.bias"}
    assert np.isclose(tensor_bytes(download_tensors(sb, {}, FedSB.adapter_plan, first=False)),
                      tensor_bytes({"l.lora_R": R, "head.classifier.bias": torch.zeros(4)}))
