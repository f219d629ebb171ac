"""Every form of data (Parquet, gzip JSON lines, datasets.save_to_disk folders) reads as CSV/JSONL does,
for every task, with the same column rules and the same one-line refusals."""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from fedlora.data.choices import read_choice_file
from fedlora.data.loading import load_file
from fedlora.data.readers import READERS, read_rows, reader_for
from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.tasks import get_task


def _parquet(rows: list[dict], path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path.with_suffix(".parquet"))
    return path.with_suffix(".parquet")


def _jsonl_gz(rows: list[dict], path: Path) -> Path:
    out = path.with_suffix(".jsonl.gz")
    with gzip.open(out, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return out


def _json_array(rows: list[dict], path: Path) -> Path:
    out = path.with_suffix(".json")   # alpaca_data.json's form: one indented array of objects
    out.write_text(json.dumps(rows, indent=4), encoding="utf-8")
    return out


def _dataset(rows: list[dict], path: Path) -> Path:
    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _dataset_dict(rows: list[dict], path: Path) -> Path:
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


#: The forms a test writes its rows in (the typed ones: values keep their types).
WRITERS = {"parquet": _parquet, "jsonl.gz": _jsonl_gz, "json-array": _json_array, "save_to_disk": _dataset,
           "dataset_dict": _dataset_dict}


def _toy_rows(tiny_csv: Path) -> list[dict]:
    """The rows of the toy CSV, labels as integers (as a Parquet or datasets table holds them)."""
    with tiny_csv.open(newline="") as fh:
        return [{"text": r["text"], "label": int(r["label"])} for r in csv.DictReader(fh)]


@pytest.mark.parametrize("form", sorted(WRITERS))
@pytest.mark.parametrize("task", ["classification", "causal-lm", "sft"])
def test_every_form_loads_the_csv_rows_for_every_task(tiny_csv, tmp_path, form, task):
    # Prepare: the toy CSV's 180 rows in another form; sft asks them as questions with label words
    data = WRITERS[form](_toy_rows(tiny_csv), tmp_path / "toy")
    cfg = replace(JobConfig(), task=task)
    if task == "sft":
        cfg = replace(cfg, prompt_template="Colour? {text}", label_words="0=red,1=green,2=blue")
    # Execute
    expected = get_task(task).load(str(tiny_csv), cfg)
    got = get_task(task).load(str(data), cfg)
    # Assert: the same texts, labels (ids and names), responses and choices
    assert len(got) == 180 and got == expected
    assert got.label_names == (["0", "1", "2"] if task != "causal-lm" else [])


@pytest.mark.parametrize("form", ["parquet", "save_to_disk"])
def test_typed_forms_keep_chat_messages_and_choice_lists(tmp_path, form):
    # Prepare: chat rows and multiple-choice rows, as JSON lines and in a typed form
    chat = [{"messages": [{"role": "user", "content": f"{i}+{i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(3)]
    mc = [{"question": "Sky?", "choices": ["blue", "green"], "answer": 0},
          {"question": "Grass?", "choices": ["blue", "green", "red"], "answer": 1}]
    sft = replace(JobConfig(), task="sft")
    for n, rows in enumerate((chat, mc)):
        jsonl = tmp_path / f"{n}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data = WRITERS[form](rows, tmp_path / f"{n}")
        # Execute
        got, expected = get_task("sft").load(str(data), sft), get_task("sft").load(str(jsonl), sft)
        # Assert: chat prompts are the earlier turns; questions keep their choices and answers
        assert got == expected
    assert got.choices == [["blue", "green"], ["blue", "green", "red"]] and got.labels == [0, 1]
    assert read_choice_file(data) == got


def test_a_class_label_column_reads_as_its_names(tmp_path):
    from datasets import ClassLabel, Features, Value

    # Prepare: ids 1, 0, -1 (no label) of the names ["pos", "neg"] (not in sorted order)
    features = Features({"text": Value("string"), "label": ClassLabel(names=["pos", "neg"])})
    Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, -1]}, features=features).save_to_disk(
        str(tmp_path / "ds"))
    # Execute / Assert: the names, as a CSV of names would give them (an SFT job's answers are words);
    # -1 is no label, refused as a null label is (it was a class "-1")
    assert [r["label"] for r in read_rows(tmp_path / "ds")] == ["neg", "pos", None]
    with pytest.raises(UserError, match=r"^1 row\(s\) of ds have no 'label' \(unlabelled: null, NaN,"
                                        r" empty, '-' or a ClassLabel's -1; the first is data row 3\)"):
        load_file(tmp_path / "ds")


def test_a_missing_column_is_the_csv_message(tmp_path):
    # Prepare: the same rows, without the label column, as CSV and as Parquet
    rows = [{"text": "good film", "y": 1}, {"text": "dull", "y": 0}]
    (tmp_path / "d.csv").write_text("text,y\ngood film,1\ndull,0\n")
    parquet = _parquet(rows, tmp_path / "d")
    sft = replace(JobConfig(), task="sft")
    for load in (lambda p: load_file(p), lambda p: get_task("sft").load(str(p), sft)):
        with pytest.raises(UserError) as from_csv:
            load(tmp_path / "d.csv")
        with pytest.raises(UserError) as from_parquet:
            load(parquet)
        # Assert: one line, word for word the CSV's but for the file's name
        assert str(from_parquet.value) == str(from_csv.value).replace("d.csv", "d.parquet")
        assert "\n" not in str(from_parquet.value) and "(columns: text, y)" in str(from_parquet.value)


def test_unreadable_and_unknown_forms_are_one_line(tmp_path):
    # Prepare
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip")
    (tmp_path / "a.json").write_text('[{"text": "a"}, "b"]')
    (tmp_path / "b.json").write_text('[{"text": "a"},\n {"text": }]')
    # pandas' to_json by default (orient="columns"), and orient="split": one object of the whole table
    (tmp_path / "cols.json").write_text('{"text":{"0":"a","1":"b"},"label":{"0":1,"1":0}}')
    (tmp_path / "split.json").write_text('{"columns":["text","label"],"index":[0],"data":[["a",1]]}')
    (tmp_path / "plain").mkdir()
    DatasetDict({"train": Dataset.from_list([{"text": "a"}]), "test": Dataset.from_list([{"text": "b"}])}
                ).save_to_disk(str(tmp_path / "dd"))
    cases = {"x.parquet": r"x\.parquet: not a readable Parquet file \(",
             "x.jsonl.gz": r"x\.jsonl\.gz: not a gzip-compressed file \(",
             "a.json": r"a\.json: item 1 of the JSON array is a str, not an object \(a row of named"
                       r" columns\)$",
             "b.json": r"b\.json:2: not a JSON array of objects \(Expecting value\)$",
             "plain": r"^unsupported data folder '.*plain': use a \.csv, .* or \.parquet file, or a"
                      r" datasets\.save_to_disk folder$",
             "dd": r"dd is a DatasetDict of the splits train, test: pass one split's folder, e\.g\."
                   r" .*dd/train$",
             "nope.parquet": r"^data file '.*nope\.parquet' not found$",
             **dict.fromkeys(("cols.json", "split.json"), r"one JSON object of the whole table \(as"
                             r" pandas' to_json writes it by default\), not a row per example: write rows")}
    for name, message in cases.items():
        # Execute / Assert
        with pytest.raises(UserError, match=message) as err:
            read_rows(tmp_path / name)
        assert "\n" not in str(err.value)
    assert read_rows(tmp_path / "dd" / "test") == [{"text": "b"}]  # a split's own folder reads


def test_every_form_is_one_registered_reader(tmp_path):
    # Assert: a file's form is found by its name's end, a folder's by its marker file
    assert {r.name for r in READERS.values()} >= {"CSV", "TSV", "JSON lines", "gzip JSON lines", "Parquet"}
    rows = [{"text": "a", "label": 0}]
    for form, write in WRITERS.items():
        path = write(rows, tmp_path / form.replace(".", "_"))
        assert reader_for(path).typed and read_rows(path) == rows
    (tmp_path / "a.csv").write_text("text,label\na,0\n")
    assert read_rows(tmp_path / "a.csv") == [{"text": "a", "label": "0"}]  # CSV values are text


@pytest.mark.parametrize("form", ["parquet", "jsonl.gz", "save_to_disk"])
def test_preference_pairs_read_from_every_file_form(tmp_path, form):
    # Prepare: prompt/chosen/rejected rows as JSON lines and in another form
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = WRITERS[form](rows, tmp_path / "p")
    dpo = replace(JobConfig(), task="dpo")
    # Execute / Assert: the same pairs
    got = get_task("dpo").load(str(data), dpo)
    assert got == get_task("dpo").load(str(jsonl), dpo) and got.rejected == [f"bad {i}" for i in range(4)]


def test_a_parquet_class_label_column_reads_as_its_names(tmp_path):
    from datasets import ClassLabel, Features, Value

    # Prepare: the same ClassLabel column as a save_to_disk folder and as datasets' (and the hub's)
    # Parquet; before, the Parquet file's ids were its labels, so a folder's --data and a Parquet
    # --test-data of one dataset had no label in common, and GLUE's test -1 was a class
    features = Features({"text": Value("string"), "label": ClassLabel(names=["pos", "neg"])})
    ds = Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, -1]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    ds.to_parquet(str(tmp_path / "ds.parquet"))
    # Execute / Assert
    assert read_rows(tmp_path / "ds.parquet") == read_rows(tmp_path / "ds")
    assert [r["label"] for r in read_rows(tmp_path / "ds.parquet")] == ["neg", "pos", None]
    with pytest.raises(UserError, match=r"^1 row\(s\) of ds.parquet have no 'label' \(unlabelled"):
        load_file(tmp_path / "ds.parquet")


def test_a_class_label_keeps_its_ids_order_and_every_name(tmp_path):
    from datasets import ClassLabel, Features, Value

    # emotion's ClassLabel is sadness, joy, love, anger, ...: its ids were renumbered in sorted name
    # order, so a prediction read with the dataset's int2str named another class
    names = ["sadness", "joy", "love", "anger"]
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    ds = Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "emo"))
    ds.to_parquet(str(tmp_path / "emo.parquet"))
    for path in (tmp_path / "emo", tmp_path / "emo.parquet"):
        got = load_file(path)
        assert got.label_names == names and got.labels == [1, 0, 1]     # the dataset's ids
    # a CSV of the same names: sorted, as before
    (tmp_path / "emo.csv").write_text("text,label\na,joy\nb,sadness\n")
    assert load_file(tmp_path / "emo.csv").label_names == ["joy", "sadness"]
