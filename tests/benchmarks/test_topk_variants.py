"""benchmarks/topk_variants.py's two study codings, by hand (no training)."""

from __future__ import annotations

import torch

import fedlora.rounds.compress as codings
from tests.benchmarks.bench_scripts import load_script


def test_global_and_head_whole_keep_the_entries_a_hand_count_gives_and_round_trip(monkeypatch):
    # Prepare: 7 entries in two tensors, and a head; top-k 0.3 keeps ⌈2.1⌉ = 3 of 7 (⌈0.9⌉ = 1 of 3, 2 of 4)
    study = load_script("topk_variants")
    a, b = torch.tensor([5.0, -1.0, 0.5]), torch.tensor([[-4.0, 0.1], [3.0, 0.2]])
    head = torch.tensor([0.1, -0.2])
    scheme = codings.TopK(0.3)
    # Execute
    over_all = study.kept("global", scheme.k, {"a": a, "b": b})
    by_tensor = study.kept("head-whole", scheme.k, {"a": a, "b": b, "classifier.weight": head})
    monkeypatch.setattr(codings, "pack", codings.pack)  # restored after the test
    monkeypatch.setattr(codings, "unpack", codings.unpack)
    study.patch("global")
    got = codings.unpack(scheme, codings.pack(scheme, {"a": a, "b": b}))
    # Assert: one threshold (|3|) over both tensors; per tensor, the head whole
    assert {k: v.tolist() for k, v in over_all.items()} == {"a": [0], "b": [0, 2]}
    assert {k: v.tolist() for k, v in by_tensor.items()} == {"a": [0], "b": [0, 2],
                                                             "classifier.weight": [0, 1]}
    assert got["a"].tolist() == [5.0, 0.0, 0.0] and got["b"].tolist() == [[-4.0, 0.0], [3.0, 0.0]]
    assert codings.pack(codings.SCHEMES["int8"], {"a": a})["a"].dtype == torch.int8  # others: fedlora's


def test_the_energy_record_and_table_by_hand(monkeypatch, tmp_path):
    # Prepare: two uploads of one round (2 clients), top-k 0.5 of 4 entries keeps 2
    study = load_script("topk_variants")
    monkeypatch.setattr(codings, "pack", codings.pack)  # restored after the test
    registered = []
    monkeypatch.setattr("atexit.register", registered.append)
    study.record_energy(tmp_path / "energy.json")
    scheme = codings.TopK(0.5)
    # Execute: what fedlora's coding keeps is recorded, per tensor, as the share of its squared norm
    B = "m.query.B"
    codings.pack(scheme, {B: torch.tensor([3.0, -4.0, 1.0, 0.0]), "classifier.weight": torch.ones(4)})
    codings.pack(scheme, {B: torch.tensor([1.0, 1.0, 1.0, 1.0]), "classifier.weight": torch.zeros(4)})
    codings.pack(codings.SCHEMES["int8"], {"a": torch.ones(2)})      # not top-k: not recorded
    registered[0]()
    table = study.energy_table(tmp_path / "energy.json", clients=2, fraction=0.5)
    # Assert: B keeps 25 of 26, then 2 of 4; the head 2 of 4, and all of nothing; a Gaussian keeps 0.93
    assert table.splitlines()[2:] == ["| 1 | B | 4 | 0.73 (0.50–0.96) | 0.93 |",
                                      "| 1 | head weight | 4 | 0.75 (0.50–1.00) | 0.93 |"]
    assert round(study.gaussian_share(0.1), 3) == 0.439 and study.gaussian_share(1.0) == 1.0
