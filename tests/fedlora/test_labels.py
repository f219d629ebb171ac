"""A labeled file's columns and labels checked in one line each: a pair of text columns, a text
column that is the label, a file without a header, scores, unlabelled rows, empty texts, and a
``ClassLabel`` that names classes no row has."""

from __future__ import annotations

import datasets
import pytest

from fedlora.data.loading import load_file
from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.job.setup import splits


def test_a_classlabel_naming_classes_no_row_has_is_still_one_label(tmp_path):
    # Prepare: a ClassLabel of two names (its ids kept: every name is a label), every row of one
    path = tmp_path / "positives.parquet"
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 1]}, features=features).to_parquet(path)
    # Execute / Assert: refused as a file of one label is, not trained on one class
    with pytest.raises(UserError, match=r"--data .*positives\.parquet has one label \('pos'\): a classifier"):
        splits(JobConfig(data=str(path)))


def test_two_text_columns_joined_by_plus_are_a_pair(tmp_path):
    path = tmp_path / "rte.csv"
    path.write_text("sentence1,sentence2,label\nthe cat sat,a cat sits,1\nthe sky is blue,it rains,0\n")
    ds = load_file(path, "sentence1+sentence2", "label")
    assert ds.texts == ["the cat sat", "the sky is blue"] and ds.second == ["a cat sits", "it rains"]
    assert ds.subset([1]).second == ["it rains"] and ds.relabel(["0", "1"]).second == ds.second
    assert ds.joined() == ["the cat sat\n\na cat sits", "the sky is blue\n\nit rains"]
    assert load_file(path, "sentence1", "label").second is None
    # a column whose own name holds a + is that column
    odd = tmp_path / "odd.csv"
    odd.write_text("a+b,label\nx,1\n")
    assert load_file(odd, "a+b", "label").texts == ["x"]
    with pytest.raises(UserError, match=r"^text column 'sentence3' is not in rte.csv .*--text-column"):
        load_file(path, "sentence1+sentence3", "label")
    with pytest.raises(UserError, match=r"^--test-text-column 'a\+b\+c': give a column, or two joined by \+"):
        load_file(path, "a+b+c", "label", flags="test-")


def test_a_missing_column_of_a_pair_is_advised_as_the_pair(tmp_path):
    # the advice replaces the missing column within the pair: following it keeps both texts
    path = tmp_path / "rte.csv"
    path.write_text("sentence1,sentence2,label\nthe cat sat,a cat sits,1\n")
    with pytest.raises(UserError, match=r"^text column 'sentence3' is not in rte.csv \(columns: sentence1,"
                                        r" sentence2, label\); pass --text-column sentence1\+sentence2$"):
        load_file(path, "sentence1+sentence3", "label")
    with pytest.raises(UserError, match=r"; pass --text-column sentence[12]$"):  # one column: one
        load_file(path, "sentence", "label")


@pytest.mark.parametrize("text, message", [
    ("label", r"^--text-column 'label' reads the label column 'label' as text"),
    ("sentence1+label", r"^--text-column 'sentence1\+label' reads the label column 'label' as text"),
    ("sentence1+sentence1", r"^--text-column 'sentence1\+sentence1' names 'sentence1' twice"),
])
def test_a_text_column_that_is_the_label_or_a_pair_of_one_column_is_refused(tmp_path, text, message):
    # Prepare: before, the model read each row's label as its text (or one sentence twice), silently
    path = tmp_path / "rte.tsv"
    path.write_text("sentence1\tsentence2\tlabel\nthe cat sat\ta cat sits\tentailment\n"
                    "the sky is blue\tit rains\tnot_entailment\n")
    # Execute / Assert
    with pytest.raises(UserError, match=message):
        load_file(path, text, "label")


@pytest.mark.parametrize("name, body", [
    ("ag.csv", '"3","Wall St. Bears Claw Back Into the Black (Reuters)","Reuters - Short-sellers, ..."\n'
               '"4","Google IPO","Google said on Friday ..."\n'),
    ("in_domain_train.tsv", "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one.\n"
                            "gj04\t0\t*\tOne more pseudo generalization and I'm giving up.\n"),
])
def test_a_file_without_a_header_line_is_said_to_have_none(tmp_path, name, body):
    # Prepare: AG News' and CoLA's files as they ship, whose first line is a row (before, the refusal
    # told the user to pass a text of that row as the column name)
    path = tmp_path / name
    path.write_text(body)
    # Execute / Assert
    with pytest.raises(UserError, match=r"first line looks like a row of data, not column names .*add a"
                                        r" header line") as info:
        load_file(path, "text", "label")
    assert "pass --text-column" not in str(info.value)


def test_a_missing_column_of_a_pair_is_guessed_keeping_the_pair(tmp_path):
    path = tmp_path / "mrpc.tsv"
    path.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tthe cat sat\ta cat sits\n")
    with pytest.raises(UserError, match=r"pass --text-column #1 String\+#2 String$"):
        load_file(path, "#1 String+#2 Strin", "Quality")


def test_scores_with_fractions_are_refused_as_a_regression_target(tmp_path):
    # Prepare: STS-B's similarity (0 to 5); before, each distinct score became a class of its own
    path = tmp_path / "sts-b.tsv"
    path.write_text("sentence1\tsentence2\tscore\na plane takes off\tan air plane is taking off\t5.000\n"
                    "a man plays a flute\ta man plays a bamboo flute\t3.800\n"
                    "A man is smoking\tA man skates\t0.500\n")
    # Execute / Assert: one line; integer scores (5.000) are still classes
    with pytest.raises(UserError, match=r"^'score' of sts-b.tsv holds scores with fractions \(0.500, 3.800;"
                                        r" 3 distinct values\): a regression target.*which --task"
                                        r" regression fits"):
        load_file(path, "sentence1+sentence2", "score")
    path.write_text("text\tscore\na\t5.000\nb\t3\nc\t1.0\n")
    assert load_file(path, "text", "score").label_names == ["1", "3", "5"]


@pytest.mark.parametrize("form", ["tsv", "csv", "jsonl", "parquet", "folder"])
def test_scores_are_read_as_numbers_in_every_data_form(tmp_path, form):
    import datasets

    # Prepare: STS-B's rows (a pair and a score) in one of the data forms; JSON and Parquet keep numbers
    rows = {"sentence1": ["a plane takes off", "a man plays a flute", "a man is smoking"],
            "sentence2": ["an air plane is taking off", "a man plays a bamboo flute", "a man skates"],
            "score": [5.0, 3.8, 0.5]}
    path = tmp_path / f"sts-b.{form}"
    table = datasets.Dataset.from_dict(rows)
    if form in ("tsv", "csv"):
        sep = "\t" if form == "tsv" else ","
        lines = [sep.join(rows)] + [sep.join(map(str, r)) for r in zip(*rows.values(), strict=True)]
        path.write_text("\n".join(lines).replace("5.0", "5.000") + "\n")
    elif form == "jsonl":
        table.to_json(path)
    elif form == "parquet":
        table.to_parquet(path)
    else:
        table.save_to_disk(path)
    # Execute
    ds = load_file(path, "sentence1+sentence2", "score", scores=True)
    # Assert: the scores as floats, the pair kept, no classes; a subset keeps each row's score
    assert ds.targets == [5.0, 3.8, 0.5] and ds.labels is None and ds.label_names == []
    assert ds.second[1] == "a man plays a bamboo flute" and ds.subset([2, 0]).targets == [0.5, 5.0]


@pytest.mark.parametrize(("cells", "message"), [
    (["3.8", "high", "1e-1"], r"^1 row\(s\) of s.tsv have a 'score' that is not a number \(the first is data"
                              r" row 2: 'high'\): --task regression fits numeric targets"),
    (["3.8", "nan", "inf"], r"^2 row\(s\) of s.tsv have a 'score' that is not a number \(the first is data"
                            r" row 2: 'nan'\)"),
    (["3.8", "1e400", "1e39"], r"^2 row\(s\) of s.tsv have a 'score' that is not a number \(the first is"
                               r" data row 2: '1e400'\)"),
    (["3.8", "", "1"], r"^1 row\(s\) of s.tsv have no 'score' \(unlabelled: .* data row 2\)"),
])
def test_scores_that_are_not_numbers_or_missing_are_refused_in_one_line(tmp_path, cells, message):
    path = tmp_path / "s.tsv"
    path.write_text("text\tscore\n" + "".join(f"t{i}\t{c}\n" for i, c in enumerate(cells)))
    with pytest.raises(UserError, match=message) as err:
        load_file(path, "text", "score", scores=True)
    assert "\n" not in str(err.value)


def test_scores_read_signs_exponents_and_leading_points(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("text,score\na,-1\nb,+2.5\nc,.5\nd,2e-1\ne, 4. \n")
    assert load_file(path, "text", "score", scores=True).targets == [-1.0, 2.5, 0.5, 0.2, 4.0]


def test_snli_rows_whose_gold_label_is_a_dash_are_unlabelled_not_a_class(tmp_path):
    # Prepare: SNLI's own JSON lines, where annotators did not agree (before, "-" was a fourth class)
    path = tmp_path / "snli_1.0_dev.jsonl"
    path.write_text('{"gold_label": "neutral", "sentence1": "A man.", "sentence2": "A person."}\n'
                    '{"gold_label": "-", "sentence1": "Two dogs run.", "sentence2": "Dogs play."}\n'
                    '{"gold_label": "contradiction", "sentence1": "A cat.", "sentence2": "No cat."}\n')
    # Execute / Assert
    with pytest.raises(UserError, match=r"^1 row\(s\) of snli_1.0_dev.jsonl have no 'gold_label'"
                                        r" \(unlabelled: null, NaN, empty, '-' or a ClassLabel's -1;"
                                        r" the first is data row 2"):
        load_file(path, "sentence1+sentence2", "gold_label")
    polarity = tmp_path / "polarity.csv"                 # beside "+", "-" is a class
    polarity.write_text("text,label\ngood,+\nbad,-\n")
    assert load_file(polarity).label_names == ["+", "-"]
    spaced = tmp_path / "spaced.csv"                     # labels are read stripped: " -" is "-"
    spaced.write_text("text,label\na man,entailment\ntwo dogs, -\n")
    with pytest.raises(UserError, match=r"^1 row\(s\) of spaced.csv have no 'label'"):
        load_file(spaced)
    polarity.write_text("text,label\ngood, +\nbad,-\n")
    assert load_file(polarity).label_names == ["+", "-"]


def test_rows_with_an_empty_text_are_said_once(tmp_path, capsys):
    path = tmp_path / "gaps.csv"
    path.write_text('text,label\n"",1\nfine,0\n"  ",1\n')
    ds = load_file(path, "text", "label")
    assert len(ds) == 3 and capsys.readouterr().err.count("2 of 3 rows of gaps.csv have an empty 'text'") == 1
    pair = tmp_path / "pair.csv"
    pair.write_text('a,b,label\n"",x,1\ny,"",0\n')       # one text of a pair is enough
    load_file(pair, "a+b", "label")
    assert "empty" not in capsys.readouterr().err


def test_a_test_files_classlabel_name_no_row_has_is_no_unknown_label(tmp_path):
    # Prepare: --data of neg/pos; a test Parquet whose ClassLabel also names 'neutral', which no row has
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"t{i},{'neg' if i % 2 else 'pos'}\n" for i in range(8)))
    test = tmp_path / "test.parquet"
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neutral", "pos", "neg"])})
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [2, 1, 2]},
                               features=features).to_parquet(test)
    # Execute
    train, held, names = splits(JobConfig(data=str(data), test_data=str(test)))
    # Assert: the rows keep their labels under --data's numbering; a row of a label --data lacks is refused
    assert names == ["neg", "pos"] and [names[i] for i in held.labels] == ["neg", "pos", "neg"]
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=features).to_parquet(test)
    with pytest.raises(UserError, match=r"labels 'neutral' of --test-data .* are not among the job's labels"):
        splits(JobConfig(data=str(data), test_data=str(test)))
