"""Offline datasets, files with named columns, splits and partitions."""

from __future__ import annotations

import warnings

import pytest

from fedlora.data.loading import TextDataset, load_bbcnews, load_dataset, load_file, partition, split
from fedlora.errors import UserError


def test_bbcnews_is_offline_sorted_and_complete():
    ds = load_bbcnews()
    assert len(ds) == 2225
    assert ds.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert [ds.labels.count(i) for i in range(5)] == [510, 386, 417, 511, 401]


def test_tsv_and_jsonl_with_named_columns(tmp_path):
    # Prepare
    tsv = tmp_path / "d.tsv"
    tsv.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\nfine\t1\n")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "a", "y": "neg"}\n{"body": "b", "y": "pos"}\n')
    # Execute
    a = load_file(tsv, text_column="sentence")
    b = load_dataset(str(jsonl), text_column="body", label_column="y")
    # Assert: numeric labels keep their value order; string labels sort
    assert a.texts == ["good film", "bad film", "fine"] and a.labels == [1, 0, 1]
    assert b.label_names == ["neg", "pos"] and b.labels == [0, 1]


def test_missing_column_and_file_errors_are_one_line(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\nhi,0\n")
    with pytest.raises(UserError, match=r"label column 'y' is not in d.csv \(columns: text, label\)"):
        load_file(f, label_column="y")
    with pytest.raises(UserError, match="not found"):
        load_file(tmp_path / "nope.csv")
    with pytest.raises(UserError, match="^data file 'data/nope.csv' not found$"):  # not a hub dataset id
        load_file("data/nope.csv")
    with pytest.raises(UserError, match="unsupported data file"):
        (tmp_path / "x.xlsx").write_text("")
        load_file(tmp_path / "x.xlsx")


def test_a_spreadsheet_csv_with_a_byte_order_mark_reads_its_first_column_by_name(tmp_path):
    f = tmp_path / "excel.csv"
    f.write_bytes("text,label\r\ngood,1\r\nbad,0\r\n".encode("utf-8-sig"))
    ds = load_file(f)
    assert ds.texts == ["good", "bad"] and ds.labels == [1, 0]


def test_a_missing_column_names_the_one_meant(tmp_path):
    # Prepare: the text is under another case, another name, or a near spelling
    upper, review, typo = tmp_path / "u.csv", tmp_path / "r.tsv", tmp_path / "t.csv"
    upper.write_text("Text,Label\nhi,0\n")
    review.write_text("label\tid\treview\n1\t7\ta long review text\n0\t8\tanother one\n")
    typo.write_text("text,lable\nhi,0\n")
    # Execute / Assert
    with pytest.raises(UserError, match=r"text column 'text' is not in u.csv .*; pass --text-column Text$"):
        load_file(upper)
    with pytest.raises(UserError, match=r"pass --text-column review$"):    # the longest values
        load_file(review)
    with pytest.raises(UserError, match=r"label column 'label' .*; pass --label-column lable$"):
        load_file(typo)


def test_a_missing_text_column_is_never_said_to_be_an_id_column(tmp_path):
    # Prepare: a client's pair file without its second text (RTE's columns less sentence2): its idx
    # column, of numbers only, has the longest values of the columns left
    f = tmp_path / "rte.tsv"
    f.write_text("idx\tsentence1\tlabel\n10\tA\tentailment\n11\tB\tnot_entailment\n")
    # Execute / Assert: it was advised as --text-column sentence1+idx
    with pytest.raises(UserError, match=r"text column 'sentence2' is not in rte\.tsv .*; pass --text-column"
                                        r" sentence1\+NAME$"):
        load_file(f, "sentence1+sentence2")


def test_a_missing_text_column_is_never_said_to_be_the_label_column(tmp_path):
    # Prepare: the label column has the longest values, and "labels" is spelled like "label"
    f = tmp_path / "d.csv"
    f.write_text("id,label,body\n1,positive,ok\n2,negative,no\n")
    # Execute / Assert: the longest values of the other columns; not the text column for a label typo
    for text, message in (("text", "text column 'text'"), ("labels", "text column 'labels'")):
        with pytest.raises(UserError, match=rf"{message} is not in d\.csv .*; pass --text-column body$"):
            load_file(f, text)
    with pytest.raises(UserError, match=r"label column 'bod' is not in d\.csv .*; pass --label-column NAME$"):
        load_file(f, "body", "bod")


@pytest.mark.parametrize("body", ["text,label\na,0\nb,\nc,1\nd, \n",
                                  '{"text": "a", "label": 0}\n{"text": "b", "label": null}\n'
                                  '{"text": "c", "label": 1}\n{"text": "d", "label": ""}\n',
                                  # json.dumps writes a missing float as NaN (it was a class "nan")
                                  '{"text": "a", "label": 0}\n{"text": "b", "label": NaN}\n'
                                  '{"text": "c", "label": 1}\n{"text": "d", "label": -Infinity}\n'])
def test_rows_without_a_label_are_refused_not_made_a_class(tmp_path, body):
    f = tmp_path / ("d.csv" if body.startswith("text") else "d.jsonl")
    f.write_text(body)
    with pytest.raises(UserError, match=r"^2 row\(s\) of d\.\w+ have no 'label' \(unlabelled: null, NaN,"
                                        r" empty, '-' or a ClassLabel's -1; the first is data row 2\):"
                                        r" fill in their labels or drop those rows$"):
        load_file(f)


def test_a_row_with_a_field_more_or_less_is_refused_with_its_line(tmp_path):
    # Prepare: an unquoted comma in a text would make " world" a label; a row without its label
    extra, short = tmp_path / "extra.csv", tmp_path / "short.tsv"
    extra.write_text('text,label\n"quoted, fine",0\nhello, world,1\n')
    short.write_text("text\tlabel\na\t0\nb\n")
    # Execute / Assert: the line of the file, and what would fix it
    with pytest.raises(UserError, match=r"extra\.csv:3: 3 fields where the header has 2; quote a text that"
                                        r" holds a comma"):
        load_file(extra)
    with pytest.raises(UserError, match=r"short\.tsv:3: 1 fields where the header has 2"):
        load_file(short)


def test_a_quoted_field_over_several_lines_is_one_row_and_one_warning(tmp_path, capsys):
    f = tmp_path / "d.csv"
    f.write_text('text,label\ngood,1\n"a stray quote,0\nbad,0\nok",1\nfine,0\n')
    ds = load_file(f)
    assert ds.texts == ["good", "a stray quote,0\nbad,0\nok", "fine"]
    assert capsys.readouterr().err.count("d.csv:3: a quoted field runs over several lines") == 1


def test_a_tsv_file_quotes_nothing_unless_it_quotes_a_cell_whole(tmp_path, capsys):
    # Prepare: GLUE's TSV (quotes are text: one starts a cell, one is unbalanced), and pandas' (a text
    # holding a quote is quoted whole, its quotes doubled)
    glue, pandas = tmp_path / "glue.tsv", tmp_path / "pandas.tsv"
    glue.write_text('sentence\tlabel\n"great" movie\t1\n"a stray quote\t0\nbad\t0\nok"\t1\nfine\t0\n'
                    'say "no"\t0\nlast\t1\n"I love it," she said, "really."\t1\n')  # starts and ends with "
    pandas.write_text('text\tlabel\n"say ""hi"" now"\t1\nplain\t0\n')
    # Execute
    g, pd = load_file(glue, "sentence"), load_file(pandas)
    # Assert: every line of GLUE's is its row, as it is written (7 rows, not 4); pandas' unquoted
    assert g.texts == ['"great" movie', '"a stray quote', "bad", 'ok"', "fine", 'say "no"', "last",
                       '"I love it," she said, "really."']
    assert g.labels == [1, 0, 0, 1, 0, 0, 1, 1] and "several lines" not in capsys.readouterr().err
    assert pd.texts == ['say "hi" now', "plain"] and pd.labels == [1, 0]


def test_a_cell_longer_than_the_csv_modules_limit_is_read(tmp_path):
    # Prepare: a 200,000-character document (the csv module stops at 131,072 by default)
    text = "word " * 40_000
    for name, sep in (("long.csv", ","), ("long.tsv", "\t")):
        (tmp_path / name).write_text(f"text{sep}label\n{text}{sep}1\nshort{sep}0\n")
        # Execute / Assert
        ds = load_file(tmp_path / name)
        assert ds.texts == [text, "short"] and ds.label_names == ["0", "1"] and ds.labels == [1, 0]


def test_another_separator_and_spaced_header_names(tmp_path):
    semi, spaced = tmp_path / "semi.csv", tmp_path / "spaced.csv"
    semi.write_text("text;label\nhi;0\n")
    spaced.write_text("text, label\nhi, 0\nho, 1\n")
    with pytest.raises(UserError, match=r"header 'text;label' is one column: its fields are separated by"
                                        r" semicolons"):
        load_file(semi)
    ds = load_file(spaced)                                 # the column is "label", its values 0 and 1
    assert ds.label_names == ["0", "1"] and ds.texts == ["hi", "ho"]


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    # Prepare: the last 'text' column would have been trained on, the first lost
    for name, sep in (("d.csv", ","), ("d.tsv", "\t")):
        (tmp_path / name).write_text(sep.join(["text", "label", " text"]) + "\n" + sep.join("a0b") + "\n")
        # Execute / Assert
        with pytest.raises(UserError, match=rf"^.*{name}: its header names the column 'text' twice"
                                            r" \(columns 1 and 3\); rename one, so each column has its own"
                                            r" name$"):
            load_file(tmp_path / name)
    # a spreadsheet's trailing unnamed columns are not names given twice
    (tmp_path / "sheet.csv").write_text("text,label,,\nhello,1,,\nbye,0,,\n")
    assert load_file(tmp_path / "sheet.csv").texts == ["hello", "bye"]


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    f = tmp_path / "latin1.csv"
    f.write_bytes("text,label\ncaf\u00e9,0\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.csv: not UTF-8 text \(byte b'\\xe9' at offset 14\);"
                                        r" re-save it as UTF-8$"):
        load_file(f)


@pytest.mark.parametrize("row, message", [
    ('{"label": 1}', r"data row 2 of d\.jsonl has no 'text': give every row each column$"),
    ('{"text": null, "label": 1}', r"data row 2 of d\.jsonl: 'text' is null; give it a text"),
    ('{"text": NaN, "label": 1}', r"data row 2 of d\.jsonl: 'text' is nan \(a missing value\); give it"),
    ('{"text": ["a", "b"], "label": 1}', r"data row 2 of d\.jsonl: 'text' is a list \(.*\), not text"),
    ('{"text": "b", "label": {"y": 1}}', r"data row 2 of d\.jsonl: 'label' is a dict \(.*\), not text"),
])
def test_a_text_cell_that_is_not_text_is_refused_not_made_none(tmp_path, row, message):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": 0}\n' + row + "\n")
    with pytest.raises(UserError, match=message):
        load_file(f)


def test_labels_are_their_text_without_spaces_and_integer_floats_are_integers(tmp_path, capsys):
    # Prepare: "1.0" (a JSON float) and "1" are one label; " pos " is "pos"; "Pos" stays its own
    floats, spaced = tmp_path / "f.jsonl", tmp_path / "s.csv"
    floats.write_text('{"text": "a", "label": 1.0}\n{"text": "b", "label": 0}\n{"text": "c", "label": "1"}\n')
    spaced.write_text("text,label\na,pos\nb, pos \nc,Pos\nd,neg\n")
    # Execute
    f, s = load_file(floats), load_file(spaced)
    # Assert
    assert f.label_names == ["0", "1"] and f.labels == [1, 0, 1]
    assert s.label_names == ["Pos", "neg", "pos"] and s.labels == [2, 2, 0, 1]
    assert "labels 'Pos' and 'pos' of s.csv differ only in case" in capsys.readouterr().err


def test_long_integer_labels_stay_apart_and_unicode_digits_are_text(tmp_path):
    # Prepare: 17-digit ids one apart (equal as floats), as CSV text and as JSON integers; labels of
    # characters str.isdigit calls digits but int() refuses
    ids, ints, signs = tmp_path / "ids.csv", tmp_path / "ids.jsonl", tmp_path / "signs.csv"
    ids.write_text("text,label\na,12345678901234568\nb,12345678901234567\nc,12345678901234567.0\n")
    ints.write_text('{"text": "a", "label": 12345678901234568}\n{"text": "b", "label": 12345678901234567}\n')
    signs.write_text("text,label\na,\u00b3\nb,\u2460\nc,1\nd,\u00b3\n")
    # Execute
    got = [load_file(f) for f in (ids, ints, signs)]
    # Assert: two classes, by value; the signs are text labels, in code point order ('1' < '³' < '①')
    assert got[0].label_names == ["12345678901234567", "12345678901234568"] and got[0].labels == [1, 0, 0]
    assert got[1].label_names == ["12345678901234567", "12345678901234568"] and got[1].labels == [1, 0]
    assert got[2].label_names == ["1", "\u00b3", "\u2460"] and got[2].labels == [1, 2, 0, 1]


def test_split_and_iid_partition_cover_train_exactly_once(tiny_csv):
    ds = load_file(tiny_csv)
    train, test = split(ds, 0.2, seed=0)
    parts = partition(train, 4, "iid", 0.5, seed=0)
    assert len(train) == 144 and len(test) == 36
    assert sorted(i for p in parts for i in p) == list(range(144))
    assert [len(p) for p in parts] == [36, 36, 36, 36]


def test_dirichlet_partition_is_skewed_and_seeded(tiny_csv):
    ds = load_file(tiny_csv)
    a = partition(ds, 3, "dirichlet", 0.1, seed=1)
    b = partition(ds, 3, "dirichlet", 0.1, seed=1)
    assert a == b
    assert sorted(i for p in a for i in p) == list(range(len(ds)))
    shares = [max(sum(ds.labels[i] == c for i in p) for c in range(3)) / len(p) for p in a]
    assert max(shares) > 0.5   # α = 0.1: at least one client dominated by one class


def test_a_dirichlet_partition_says_nothing_of_flwr_datasets_retries():
    # Prepare: 90 of 100 examples of one class over 4 clients: flwr-datasets redraws, warning each time
    ds = TextDataset([str(i) for i in range(100)], [0] * 90 + [1] * 10, ["a", "b"])
    # Execute
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        parts = partition(ds, 4, "dirichlet", 0.3, 0)
    # Assert: every example in one client, and no warning
    assert sorted(i for part in parts for i in part) == list(range(100)) and said == []


def test_too_many_clients_is_refused(tiny_csv):
    with pytest.raises(UserError, match="1000 clients but only 180"):
        partition(load_file(tiny_csv), 1000, "iid", 0.5, seed=0)


def test_dirichlet_clients_gives_100_equal_skewed_clients_where_classwise_cannot():
    # Prepare: BBC News' 1,780 training articles (5 classes), 100 clients, α = 0.1
    import pytest

    from fedlora.errors import UserError

    train, _ = split(load_bbcnews(), 0.2, seed=0)
    # Act
    parts = partition(train, 100, "dirichlet-clients", 0.1, seed=0)
    # Assert: every article once, 17 or 18 per client, half the clients 80% one class, seeded
    assert sorted(i for p in parts for i in p) == list(range(len(train)))
    assert {len(p) for p in parts} <= {len(train) // 100, len(train) // 100 + 1}
    top = [max(sum(train.labels[i] == c for i in p) for c in range(5)) / len(p) for p in parts]
    assert sum(t >= 0.8 for t in top) >= 50  # IID clients: about 0 (57 here)
    assert parts == partition(train, 100, "dirichlet-clients", 0.1, seed=0)
    assert parts != partition(train, 100, "dirichlet-clients", 0.1, seed=1)
    # the class-wise partitioner cannot give each of 100 clients an article at α = 0.1
    with pytest.raises(UserError, match="dirichlet-clients"):
        partition(train, 100, "dirichlet", 0.1, seed=0)


def test_a_job_refuses_one_label_and_names_the_test_file_whose_label_is_foreign(tmp_path):
    from fedlora.job.schema import JobConfig
    from fedlora.job.setup import splits

    one, train, test = tmp_path / "one.csv", tmp_path / "train.csv", tmp_path / "test.jsonl"
    one.write_text("text,label\na,pos\nb,pos\n")
    train.write_text("text,label\na,0\nb,1\nc,0\n")
    test.write_text('{"text": "x", "label": 1.0}\n{"text": "y", "label": 2}\n')
    with pytest.raises(UserError, match=r"--data .*one\.csv has one label \('pos'\): a classifier learns"):
        splits(JobConfig(data=str(one)))
    with pytest.raises(UserError, match=r"^labels '2' of --test-data .*test\.jsonl are not among the job's"
                                        r" labels \(0, 1\); fix its label column$"):
        splits(JobConfig(data=str(train), test_data=str(test)))


def test_a_test_files_missing_column_names_the_test_flags(tmp_path):
    from fedlora.job.schema import JobConfig
    from fedlora.job.setup import splits

    train, test = tmp_path / "train.csv", tmp_path / "test.jsonl"
    train.write_text("text,label\na,0\nb,1\n")
    test.write_text('{"sentence": "x", "label": 1}\n')
    with pytest.raises(UserError, match=r"text column 'text' is not in test\.jsonl .*; pass"
                                        r" --test-text-column sentence$"):
        splits(JobConfig(data=str(train), test_data=str(test)))
    with pytest.raises(UserError, match=r"pass --test-text-column sentence$"):
        splits(JobConfig(task="sft", data=str(train), test_data=str(test), label_words="0=no,1=yes"))


def test_labels_are_numbered_as_a_fine_tuned_head_numbers_them(tiny_bert_dir, tmp_path, capsys):
    import json
    import shutil

    from fedlora.job.schema import JobConfig
    from fedlora.job.setup import splits

    # Prepare: a classifier whose head's rows are (pos, neg); data sorted would number them (neg, pos)
    model = tmp_path / "posneg"
    shutil.copytree(tiny_bert_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(id2label={"0": "pos", "1": "neg"}, label2id={"pos": 0, "neg": 1})
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,neg\nb,pos\nc,neg\nd,pos\n")
    # Execute
    train, test, names = splits(JobConfig(model=str(model), data=str(data), test_fraction=0.5))
    plain = splits(JobConfig(model=str(tiny_bert_dir), data=str(data), test_fraction=0.5))[2]
    # Assert: the head's order (a row scored 0.0 at round 0 for a 100% classifier before); placeholder
    # names (LABEL_0, ...) leave the sorted order
    assert names == ["pos", "neg"] and plain == ["neg", "pos"]
    rows = zip(train.texts + test.texts, train.labels + test.labels, strict=True)
    assert sorted(rows) == [("a", 1), ("b", 0), ("c", 1), ("d", 0)]
    assert "labels numbered as the head of" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_a_clients_share_loads_its_own_partition_alone(tiny_csv, monkeypatch, method):
    # Prepare: 20 clients; count flwr-datasets' partition loads (about 1 ms each: a deployed or Ray
    # client that loaded every partition to keep one spent seconds per message with thousands of clients)
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    from fedlora.job.schema import JobConfig
    from fedlora.job.setup import client_share, training_data

    loaded = []
    for cls in (IidPartitioner, DirichletPartitioner):
        real = cls.load_partition
        monkeypatch.setattr(cls, "load_partition",
                            lambda self, i, real=real: loaded.append(i) or real(self, i))
    cfg = JobConfig(data=str(tiny_csv), num_clients=20, partition=method, alpha=10.0)
    # Execute
    share = client_share(cfg, 7, 20)
    one = list(loaded)
    every = partition(training_data(cfg), 20, method, 10.0, cfg.seed)
    # Assert: client 7's partition alone was loaded, and it is the one of the whole partition
    assert one == [7]
    train = training_data(cfg)
    assert share.texts == [train.texts[i] for i in every[7]]
    assert partition(train, 20, method, 10.0, cfg.seed, clients=[7, 3]) == [every[7], every[3]]
