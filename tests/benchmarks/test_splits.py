"""``benchmarks/splits.py``: parts of a phrase corpus that share no text, by source sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
splits = load_script("splits")
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"

#: Three sentences and their pieces; "bad plot" is a piece of two of them.
PHRASES = ["good acting , bad plot", "good acting", "bad plot", "bad plot twists", "plot twists",
           "slow pacing", "pacing", "acting"]
ROOTS = {"good acting , bad plot", "bad plot twists", "slow pacing"}


def test_roots_are_the_phrases_inside_no_other_by_whole_words():
    # "act" is not inside "good acting": containment is by whole words
    assert {PHRASES[i] for i in splits.roots(PHRASES)} == ROOTS
    assert splits.roots(["good acting", "act"]) == [0, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_sentence_takes_its_pieces_and_a_piece_of_two_parts_is_dropped(seed):
    # Prepare: one root per part, whichever the seed deals where
    parts, dropped = splits.split_by_source(PHRASES, {"public": 1 / 3, "validation": 1 / 3}, seed)
    text = {part: {PHRASES[i] for i in idx} for part, idx in parts.items()}
    # Assert: "bad plot" sits in two sentences, which went to different parts
    assert [PHRASES[i] for i in dropped] == ["bad plot"]
    home = {root: part for part, rows in text.items() for root in rows & ROOTS}
    assert sorted(home.values()) == sorted(splits.PARTS)
    assert text[home["good acting , bad plot"]] == {"good acting , bad plot", "good acting", "acting"}
    assert text[home["bad plot twists"]] == {"bad plot twists", "plot twists"}
    assert text[home["slow pacing"]] == {"slow pacing", "pacing"}
    assert splits.leaks(text) == []


def test_leaks_finds_a_piece_of_another_parts_phrase():
    # a random split of rows can put a sentence and its piece on two sides
    assert splits.leaks({"public": ["good acting"], "private": ["good acting , bad plot"]}) == [
        ("public", "private", "good acting")]
    assert splits.leaks({"public": ["act"], "private": ["good acting"]}) == []


def test_split_file_writes_the_parts_and_keeps_the_header(tmp_path):
    src = tmp_path / "train.tsv"
    src.write_text("label\tsentence\n" + "".join(f"{i % 2}\t{p}\n" for i, p in enumerate(PHRASES)))
    paths = splits.split_file(src, tmp_path / "out", {"public": 1 / 3, "validation": 1 / 3}, seed=0)
    rows = {part: path.read_text().splitlines() for part, path in paths.items()}
    assert all(r[0] == "label\tsentence" for r in rows.values())
    assert sum(len(r) - 1 for r in rows.values()) == len(PHRASES) - 1   # "bad plot" dropped
    assert '"dropped": 1' in (tmp_path / "out" / "split.json").read_text()
    # a record that kept split.json alone (benchmarks/records): the parts come back, row for row
    for path in paths.values():
        path.unlink()
    again = splits.split_file(src, tmp_path / "out", {"public": 1 / 3, "validation": 1 / 3}, seed=0)
    assert {part: path.read_text().splitlines() for part, path in again.items()} == rows


@pytest.mark.slow
@pytest.mark.skipif(not SST2.is_file(), reason="SST-2 is read from ../shared/data/sst2, absent here")
def test_sst2_parts_share_no_phrase(tmp_path):
    # The benchmarks' split of SST-2's 67,349 phrases: no phrase of one part inside another's
    paths = splits.split_file(SST2, tmp_path, {"public": 0.015, "validation": 0.1}, seed=0)
    parts = {part: [r.split("\t")[1] for r in path.read_text().splitlines()[1:]]
             for part, path in paths.items()}
    assert min(len(p) for p in parts.values()) > 500
    assert splits.leaks(parts) == []
