"""Checkpoints and kept-factor files without pickle (``fedlora.rounds.checkpoint``), and the safe
reading of an older fedlora's ``checkpoint.pt`` / ``.kept.pt``."""

from __future__ import annotations

import json
import pathlib
import pickle
import struct
from types import SimpleNamespace

import pytest
import torch

from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.rounds.checkpoint import CHECKPOINT, find_checkpoint, load_checkpoint, save_checkpoint
from fedlora.strategies import GlobalState

CFG = JobConfig(strategy="fedavg", num_clients=2, rounds=3)


class Touch:
    """A pickled object whose unpickling creates ``marker`` (what a tampered file could run)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class Layer:
    """One adapted layer of one slot, recording what a restore folds and loads into it."""

    num_clients, ranks = 1, [2]

    def __init__(self) -> None:
        self.scale, self.folded, self.slots = torch.tensor([0.5]), [], {}

    def fold(self, A, B):
        self.folded.append((A, B))

    def set_slot(self, k, A, B):
        self.slots[k] = (A, B)


def _bits(t: torch.Tensor) -> tuple:
    return t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).tolist()


def _coordinator(stub_coordinator):
    """A coordinator after round 2 with every kind of checkpointed value."""
    coord = stub_coordinator(CFG)
    A = torch.tensor([[1.0, -2.0, 0.5], [3.0, 4.0, -0.0]])
    B = torch.tensor([[0.25, 1.5], [-1.0, 2.0]]).t()  # not contiguous
    fold = (torch.tensor([[7.0, 8.0, 9.0]]), torch.tensor([[1.0], [2.0]]))
    coord.state = GlobalState(factors={"q": (A, B)}, scale=0.5, merged={"q": fold},
                              head={"head.weight": torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)},
                              round=2)
    coord.round, coord.folds, coord.fresh_seed, coord.clip = 2, [{"q": fold}], 12345, 0.37
    coord.rows = [{"round": 1, "accuracy": 0.5, "agg_error": None, "bytes_up_per_client": [10, 20]},
                  {"round": 2, "accuracy": 0.625, "agg_error": 0.125, "bytes_up_per_client": [11, 21]}]
    coord.personal = {0: {"q.lora_B": torch.tensor([[1.0], [2.0]])},
                      3: {"q.lora_B": torch.tensor([[3.0], [4.0]])}}
    torch.rand(5, generator=coord.gen)  # the generator moved on from its seed
    return coord


def _old_blob(coord) -> dict:
    """What an older fedlora's ``Coordinator.save`` gave ``torch.save``."""
    from dataclasses import asdict

    return {"config": asdict(coord.cfg), "round": coord.round, "state": coord.state, "folds": coord.folds,
            "gen": coord.gen.get_state(), "fresh_seed": coord.fresh_seed, "rows": coord.rows,
            "personal": coord.personal, "clip": coord.clip}


def _assert_restored(resumed, saved) -> None:
    assert resumed.round == 2 and resumed.fresh_seed == 12345 and resumed.clip == 0.37
    assert resumed.rows == saved.rows
    got, want = resumed.state, saved.state
    assert (got.scale, got.round, got.cores) == (0.5, 2, None)
    for pair, ref in [(got.factors["q"], want.factors["q"]), (got.merged["q"], want.merged["q"]),
                      (resumed.folds[0]["q"], saved.folds[0]["q"])]:
        assert isinstance(pair, tuple) and [_bits(t) for t in pair] == [_bits(t) for t in ref]
    assert _bits(got.head["head.weight"]) == _bits(want.head["head.weight"])
    assert list(resumed.personal) == [0, 3]  # int client ids, not "0"
    assert resumed.personal[3]["q.lora_B"].tolist() == [[3.0], [4.0]]
    # the fold was re-applied to the base, the global factors loaded; the seeds go on as they would have
    layer = resumed.fm.adapters["q"]
    assert [[t.tolist() for t in f] for f in layer.folded] == [[[[7.0, 8.0, 9.0]], [[1.0], [2.0]]]]
    assert layer.slots[0][1].tolist() == [[0.25, -1.0], [1.5, 2.0]]
    assert torch.equal(torch.rand(4, generator=resumed.gen), torch.rand(4, generator=saved.gen))


def _resumed(stub_coordinator):
    coord = stub_coordinator(CFG)
    coord.fm.adapters = {"q": Layer()}
    return coord


def test_save_and_restore_give_back_the_same_state_bit_for_bit(tmp_path, stub_coordinator):
    saved = _coordinator(stub_coordinator)
    path = saved.save(tmp_path)
    resumed = _resumed(stub_coordinator)
    resumed.restore(path)
    assert path == tmp_path / "checkpoint.safetensors" == tmp_path / CHECKPOINT
    _assert_restored(resumed, saved)


def test_the_checkpoint_is_a_json_header_and_raw_tensor_bytes(tmp_path, stub_coordinator):
    from safetensors import safe_open

    path = _coordinator(stub_coordinator).save(tmp_path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    # 2 factors + 2 merged + 1 head + 2 in the fold + 2 personal + the generator's state; nothing else:
    # the tensors' bytes end the file, so there is no room for a pickle
    assert len(header) == 10
    assert max(t["data_offsets"][1] for t in header.values()) == len(raw) - 8 - n
    doc = json.loads(meta["fedlora"])
    assert doc["format"] == 1 and doc["round"] == {"json": 2} and doc["state"]["dataclass"] == "GlobalState"
    with safe_open(str(path), "pt") as fh:
        assert fh.get_tensor(doc["gen"]["tensor"]).dtype == torch.uint8


def test_an_older_checkpoint_pt_is_resumed_and_replaced(tmp_path, stub_coordinator):
    saved = _coordinator(stub_coordinator)
    torch.save(_old_blob(saved), tmp_path / "checkpoint.pt")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.pt"
    resumed = _resumed(stub_coordinator)
    resumed.restore(tmp_path / "checkpoint.safetensors")  # absent: its folder's checkpoint.pt
    _assert_restored(resumed, saved)
    # the next save writes the new format and drops the old file
    resumed.save(tmp_path)
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.safetensors"
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_checkpoint_pt_that_would_run_code_is_refused(tmp_path, stub_coordinator):
    # the payload works: plain unpickling creates the marker
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Touch(live)))
    assert live.exists()
    blob = _old_blob(_coordinator(stub_coordinator))
    marker = tmp_path / "marker"
    blob["state"] = Touch(marker)
    torch.save(blob, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match=r"^checkpoint.pt holds a pickled \S+ object, which fedlora does not"
                       r" load \(it could run code\)") as err:
        _resumed(stub_coordinator).restore(tmp_path / "checkpoint.pt")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_kept_factor_file_round_trips_and_an_old_one_is_read_safely(tmp_path, monkeypatch):
    from flwr.app import RecordDict

    from fedlora.clients.app import _keep_factors, read_kept

    monkeypatch.setenv("FEDLORA_LEDGER_DIR", str(tmp_path))
    kept = {3: {"q.lora_B": torch.tensor([[1.0], [2.0]])[1:]}}  # a view of a bigger tensor
    client = SimpleNamespace(cfg=SimpleNamespace(dp_run_id="run"), where=SimpleNamespace(client_id=2),
                             kept=kept)
    _keep_factors(client, SimpleNamespace(run_id=7, state=RecordDict()))
    assert (tmp_path / "run-client2.kept.safetensors").is_file()
    # a rebuilt node (empty context) reads the file
    got = read_kept(client, SimpleNamespace(run_id=8, state=RecordDict()))
    assert list(got) == [3] and list(got[3]) == ["q.lora_B"] and got[3]["q.lora_B"].tolist() == [[2.0]]
    # an older fedlora's .kept.pt: read when no new file is there
    (tmp_path / "run-client2.kept.safetensors").unlink()
    torch.save({"t1.q.lora_A": torch.tensor([5.0])}, tmp_path / "run-client2.kept.pt")
    got = read_kept(client, SimpleNamespace(run_id=8, state=RecordDict()))
    assert got[1]["q.lora_A"].tolist() == [5.0]
    # ...unless it pickles something other than tensors
    marker = tmp_path / "marker"
    torch.save({"t1.q.lora_A": Touch(marker)}, tmp_path / "run-client2.kept.pt")
    with pytest.raises(UserError, match="run-client2.kept.pt holds a pickled .* could run code"):
        read_kept(client, SimpleNamespace(run_id=8, state=RecordDict()))
    assert not marker.exists()


def test_saving_an_object_that_would_need_pickle_fails_and_writes_nothing(tmp_path, stub_coordinator):
    coord = _coordinator(stub_coordinator)
    coord.state.head["head.weight"] = Touch(tmp_path / "marker")
    with pytest.raises(TypeError, match="cannot store state/head/head.weight, a Touch"):
        coord.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_naming_a_class_fedlora_does_not_know_is_refused(tmp_path):
    from safetensors.torch import save_file

    doc = {"format": 1, "round": {"json": 2}, "state": {"dataclass": "Popen", "fields": {}}}
    save_file({}, tmp_path / CHECKPOINT, metadata={"fedlora": json.dumps(doc)})
    with pytest.raises(UserError, match="is not a fedlora checkpoint .*the class 'Popen', not one"):
        load_checkpoint(tmp_path)
    # the same file with a plain value there is read (and saved again) as it is
    doc["state"] = {"json": None}
    save_file({}, tmp_path / CHECKPOINT, metadata={"fedlora": json.dumps(doc)})
    assert load_checkpoint(tmp_path) == {"round": 2, "state": None}
    assert save_checkpoint(tmp_path, {"round": 2, "state": None}) == tmp_path / CHECKPOINT
    assert load_checkpoint(tmp_path / CHECKPOINT) == {"round": 2, "state": None}


def test_keys_read_only_those_values_and_no_tensor(tmp_path):
    """``--resume``'s check reads the job and the round: a state whose tensor is missing from the
    file is not decoded (read whole, the same file is refused)."""
    from safetensors.torch import save_file

    doc = {"format": 1, "round": {"json": 2}, "config": {"json": {"rounds": 3}},
           "state": {"tensor": "0:state", "device": "cpu"}}
    save_file({}, tmp_path / CHECKPOINT, metadata={"fedlora": json.dumps(doc)})
    assert load_checkpoint(tmp_path, keys=("config", "round")) == {"round": 2, "config": {"rounds": 3}}
    with pytest.raises(UserError, match="is not a fedlora checkpoint"):
        load_checkpoint(tmp_path)
