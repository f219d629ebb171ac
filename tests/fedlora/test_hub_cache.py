"""--model by hub id: found in the local Hugging Face cache without the network, or refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedlora.errors import UserError
from fedlora.models.hub import cached_snapshot, check_model_name, load_model, resolve_model_path
from fedlora.plan.shape import model_config
from fedlora.simulations.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay ``folder``'s files out as the Hugging Face cache holds a download of ``repo_id``: each file a
    blob named by its hash, the snapshot of ``main`` links to them, ``refs/main`` names that commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot, blobs = repo / "snapshots" / COMMIT, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache of this test (``HF_HUB_CACHE``)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Online mode (``HF_HUB_OFFLINE`` unset), every connection attempt recorded and refused."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network use in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_a_cached_hub_id_resolves_and_loads_offline(tiny_bert_dir, hf_cache, no_network):
    # Prepare: the tiny BERT (saved by save_pretrained) as the cache holds a download of it
    snapshot = cache_model(hf_cache, "tiny-org/tiny-bert", tiny_bert_dir)
    # Execute
    path = resolve_model_path("tiny-org/tiny-bert")
    model, tokenizer, loaded, _ = load_model("tiny-org/tiny-bert", "sequence-classification", 3)
    # Assert: the main snapshot's folder, loaded with no connection attempted; the planner reads it too
    assert path == loaded == snapshot and cached_snapshot("tiny-org/tiny-bert") == snapshot
    assert model.config.hidden_size == 32 and tokenizer("red apple")["input_ids"]
    assert model_config("tiny-org/tiny-bert").num_hidden_layers == 2
    check_model_name("tiny-org/tiny-bert")
    assert no_network == []


def test_an_id_not_in_the_cache_is_refused_in_one_line(tiny_bert_dir, tiny_csv, hf_cache, no_network,
                                                       tmp_path, capsys):
    # Prepare: the cache holds another model, and the refs of this one with no snapshot
    cache_model(hf_cache, "tiny-org/tiny-bert", tiny_bert_dir)
    (hf_cache / "models--tiny-org--absent" / "refs").mkdir(parents=True)
    (hf_cache / "models--tiny-org--absent" / "refs" / "main").write_text(COMMIT)
    # Execute / Assert: the same line from the loader, the job checks and fedlora-sim (exit 2, no --out)
    for name in ("tiny-org/absent", "tiny-org/missing"):
        expected = (f"model {name!r} is not a local folder, nor in the Hugging Face cache ({hf_cache});"
                    f" nothing is downloaded at run time: fetch it once with `hf download {name}`")
        for check in (resolve_model_path, check_model_name):
            with pytest.raises(UserError) as err:
                check(name)
            assert str(err.value) == expected
    out = tmp_path / "out"
    assert main(["--model", "tiny-org/missing", "--data", str(tiny_csv), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedlora-sim: error: {expected}"] and not out.exists()
    assert no_network == []


def test_a_parquet_file_without_the_label_column_is_the_csv_line(tiny_bert_dir, tmp_path, capsys):
    # Prepare: the same two columns as CSV and as Parquet, neither with the label column asked for
    (tmp_path / "d.csv").write_text("".join(f"t{i},{i % 2}\n" for i in range(8)).join(["text,y\n", ""]))
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(8)], "y": [i % 2 for i in range(8)]}),
                   tmp_path / "d.parquet")
    lines = []
    for name in ("d.csv", "d.parquet"):
        # Execute
        code = main(["--model", str(tiny_bert_dir), "--data", str(tmp_path / name), "--label-column", "topic",
                     "--out", str(tmp_path / name.replace(".", "-")), "--quiet"])
        lines.append(capsys.readouterr().err.strip().splitlines())
        # Assert: exit 2, one line, nothing written
        assert code == 2 and len(lines[-1]) == 1 and not (tmp_path / name.replace(".", "-")).exists()
    assert lines[1][0] == lines[0][0].replace("d.csv", "d.parquet")
    assert "label column 'topic' is not in d.parquet (columns: text, y); pass --label-column" in lines[1][0]


@pytest.mark.slow
def test_fedlora_sim_on_parquet_and_a_hub_id_equals_csv_and_folder(tiny_bert_dir, tiny_csv, hf_cache,
                                                                     no_network, tmp_path):
    # Prepare: the toy CSV as Parquet, the tiny BERT in the cache
    with tiny_csv.open() as fh:
        header, *body = [line.rstrip("\n").rsplit(",", 1) for line in fh]
    parquet = tmp_path / "toy.parquet"
    pq.write_table(pa.table({"text": [t for t, _ in body], "label": [int(y) for _, y in body]}), parquet)
    cache_model(hf_cache, "tiny-org/tiny-bert", tiny_bert_dir)
    job = ["--num-clients", "2", "--rounds", "1", "--local-steps", "2", "--batch-size", "4", "--rank", "2",
           "--max-length", "16", "--quiet"]
    # Execute: the same job from CSV and a folder, and from Parquet and the hub id
    rows = {}
    for data, model in ((tiny_csv, tiny_bert_dir), (parquet, "tiny-org/tiny-bert")):
        out = tmp_path / Path(data).suffix[1:]
        assert main(["--model", str(model), "--data", str(data), "--out", str(out), *job]) == 0
        rows[out.name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Assert: the same metrics, round by round
    same = ("round", "accuracy", "loss", "bytes_up", "bytes_down", "agg_error")
    assert [[r[k] for k in same] for r in rows["csv"]] == [[r[k] for k in same] for r in rows["parquet"]]
    assert no_network == []


def cache_dataset(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay ``files`` (path in the repository -> bytes) out as the cache holds a dataset download."""
    snapshot = cache / f"datasets--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
    return snapshot


def _parquet_bytes(rows: list[tuple[str, str]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [int(y) for _, y in rows]}), sink)
    return sink.getvalue().to_pybytes()


def test_a_cached_hub_dataset_and_a_file_pattern_read_as_the_file(tiny_bert_dir, tiny_csv, hf_cache,
                                                                   no_network, tmp_path, capsys):
    # Prepare: the toy CSV as a hub dataset of two train shards and a test file, and as two CSV files
    with tiny_csv.open() as fh:
        header, *body = [line.rstrip("\n").rsplit(",", 1) for line in fh]
    half = len(body) // 2
    cache_dataset(hf_cache, "tiny-org/toy", {
        "data/train-00000-of-00002.parquet": _parquet_bytes(body[:half]),
        "data/train-00001-of-00002.parquet": _parquet_bytes(body[half:]),
        "data/test-00000-of-00001.parquet": _parquet_bytes(body[:5]), "README.md": b"# toy"})
    for i, part in enumerate((body[:half], body[half:])):
        (tmp_path / f"toy-{i}.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in part))
    job = ["--model", str(tiny_bert_dir), "--num-clients", "2", "--rounds", "1", "--local-steps", "2",
           "--batch-size", "4", "--rank", "2", "--max-length", "16", "--quiet"]
    # Execute: the same job from the CSV, the hub id (its train split) and the pattern
    rows = {}
    for name, data in (("csv", tiny_csv), ("hub", "tiny-org/toy"), ("pattern", tmp_path / "toy-*.csv")):
        assert main([*job, "--data", str(data), "--out", str(tmp_path / name)]) == 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [json.loads(line) for line in lines]
    # Assert: the same metrics; a split the cache lacks, and a dataset not cached, are one line each
    same = ("round", "accuracy", "loss", "bytes_up")
    assert [[r[k] for k in same] for r in rows["hub"]] == [[r[k] for k in same] for r in rows["csv"]]
    assert [[r[k] for k in same] for r in rows["pattern"]] == [[r[k] for k in same] for r in rows["csv"]]
    capsys.readouterr()
    refusals = {"tiny-org/toy:validation": "dataset 'tiny-org/toy' in the cache has no 'validation' split"
                                           " (its splits: test, train);",
                "tiny-org/absent": "fetch it once with `hf download tiny-org/absent --repo-type dataset`"}
    for data, message in refusals.items():
        assert main([*job, "--data", data, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert no_network == [] and not (tmp_path / "bad").exists()


def test_a_configuration_split_and_a_one_file_repository(hf_cache):
    # Prepare: MMLU's layout (one folder per configuration) and alpaca's (one JSON file)
    from fedlora.data.instructions import load_instructions

    def mmlu(subject: str) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"question": [f"{subject} q{i}" for i in range(3)], "subject": [subject] * 3,
                                 "choices": [["a", "b", "c", "d"]] * 3, "answer": [0, 1, 2]}), sink)
        return sink.getvalue().to_pybytes()

    cache_dataset(hf_cache, "cais/mmlu",
                  {f"{s}/test-00000-of-00001.parquet": mmlu(s) for s in ("all", "anatomy")})
    cache_dataset(hf_cache, "tatsu/alpaca", {"alpaca_data.json": json.dumps(
        [{"instruction": "Say hi.", "input": "", "output": "Hi."}]).encode()})
    # Execute / Assert
    ds = load_instructions("cais/mmlu:anatomy/test", "text", "label")
    assert ds.texts == ["anatomy q0", "anatomy q1", "anatomy q2"] and ds.labels == [0, 1, 2]
    with pytest.raises(UserError, match=r"^dataset 'cais/mmlu' has 'test' files in 2 folders"
                                        r" \(all, anatomy\); name one as cais/mmlu:all/test$"):
        load_instructions("cais/mmlu:test", "text", "label")
    alpaca = load_instructions("tatsu/alpaca", "text", "label")   # no train file: the one file
    assert (alpaca.texts, alpaca.responses) == (["Say hi."], ["Hi."])


def _texts(spec: str) -> list[str]:
    from fedlora.data.readers import read_rows

    return [row["text"] for row in read_rows(spec)]


def test_a_split_is_its_whole_name(hf_cache):
    # Prepare: UltraFeedback's layout (train_prefs, train_sft, ... beside each other), GLUE's (a folder
    # per configuration, validation_matched beside validation_mismatched), and numbered shards in
    # split folders (the Hub's parquet conversion); each file's rows name it
    def files(names: list[str]) -> dict[str, bytes]:
        return {name: _parquet_bytes([(name, "0"), (name, "1")]) for name in names}

    uf = "HuggingFaceH4/ultrafeedback_binarized"
    cache_dataset(hf_cache, uf, files([f"data/{s}-00000-of-00001.parquet"
                                       for s in ("train_prefs", "train_sft", "train_gen", "test_prefs")]))
    cache_dataset(hf_cache, "nyu-mll/glue", files([
        "mnli/train-00000-of-00001.parquet", "mnli/validation_matched-00000-of-00001.parquet",
        "mnli/validation_mismatched-00000-of-00001.parquet", "sst2/validation-00000-of-00001.parquet"]))
    cache_dataset(hf_cache, "org/converted", files(["default/train/0000.parquet",
                                                    "default/train/0001.parquet",
                                                    "default/train_extra/0000.parquet"]))
    cache_dataset(hf_cache, "org/underscored", files(["data/train_0.parquet", "data/train_1.parquet",
                                                      "data/test_0.parquet"]))
    # Execute / Assert: a split is only the files of that whole name
    assert _texts(f"{uf}:train_prefs") == ["data/train_prefs-00000-of-00001.parquet"] * 2
    assert _texts(f"{uf}:test_prefs") == ["data/test_prefs-00000-of-00001.parquet"] * 2
    matched = "mnli/validation_matched-00000-of-00001.parquet"
    assert _texts("nyu-mll/glue:mnli/validation_matched") == [matched] * 2
    assert _texts("nyu-mll/glue:sst2/validation") == ["sst2/validation-00000-of-00001.parquet"] * 2
    assert _texts("org/converted") == ["default/train/0000.parquet"] * 2 + ["default/train/0001.parquet"] * 2
    assert _texts("org/underscored") == ["data/train_0.parquet"] * 2 + ["data/train_1.parquet"] * 2
    # no 'train' split (train_prefs is not one), no 'validation' beside validation_matched: one line each
    refusals = {uf: rf"^dataset '{uf}' in the cache has no 'train' split \(its splits: test_prefs, train_gen,"
                    rf" train_prefs, train_sft\); name a split as {uf}:SPLIT, or pass a file's path$",
                f"{uf}:test": "has no 'test' split",
                "nyu-mll/glue:mnli/validation": r"has no 'mnli/validation' split \(its splits: mnli/train,"
                                                r" mnli/validation_matched, mnli/validation_mismatched,"
                                                r" sst2/validation\)"}
    for spec, message in refusals.items():
        with pytest.raises(UserError, match=message):
            _texts(spec)
