"""fedlora-eval numbers a test file's labels as the adapter's run did (the label names its export
records), without --data; a label the adapter lacks, or an old adapter without --data, is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora.models.export import LABELS, export_peft
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.simulations.cli import main as sim
from fedlora.simulations.evaluate import main as evaluate
from fedlora.strategies import GlobalState

#: The run's labels in id order: not the sorted order of any test file's subset below.
NAMES = ["neg", "neutral", "pos"]


def _adapter(model_dir, out, labels):
    """An adapter whose head always answers ``pos``: weight zero, so its logits are its bias
    ``(0, 0, 5)`` whatever the (random) LoRA factors do to the pooled text."""
    from transformers import AutoModelForSequenceClassification

    fm = FederatedModel(AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3),
                        AdapterConfig(ranks=[2], alpha=2.0))
    g = torch.Generator().manual_seed(0)
    factors = {n: (torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)) for n in fm.adapters}
    head = {"classifier.weight": torch.zeros(3, 32), "classifier.bias": torch.tensor([0.0, 0.0, 5.0])}
    return export_peft(GlobalState(factors=factors, scale=1.0, head=head), list(fm.adapters), out,
                       str(model_dir), "SEQ_CLS", list(fm.heads), labels=labels)


def _csv(path, labels):
    path.write_text("text,label\n" + "".join(f"row {i} of {y},{y}\n" for i, y in enumerate(labels)))
    return path


def _eval(model_dir, tmp_path, *flags):
    return evaluate(["--model", str(model_dir), "--max-length", "16", "--out", str(tmp_path / "e"), "--quiet",
                     *flags])


def test_a_test_file_with_some_of_the_labels_is_scored_by_the_adapters_names(tiny_bert_dir, tmp_path):
    # Prepare: the adapter (always "pos"); a test file with 3 pos rows and 1 neutral (2 of its 3 labels)
    adapter = _adapter(tiny_bert_dir, tmp_path / "adapter", NAMES)
    test = _csv(tmp_path / "test.csv", ["pos", "neutral", "pos", "pos"])
    # Execute: no --data
    code = _eval(tiny_bert_dir, tmp_path, "--adapter", str(adapter), "--test-data", str(test))
    # Assert: pos is id 2 of the adapter's head, so 3 of 4 right; the loss of logits (0, 0, 5) is
    # log(1 + 2e^-5) for a pos row and 5 more for the neutral one
    assert code == 0
    (got,) = json.loads((tmp_path / "e" / "eval.json").read_text())["results"]
    assert got["accuracy"] == 0.75 and got["eval_examples"] == 4
    assert got["loss"] == pytest.approx(math.log(1 + 2 * math.exp(-5)) + 5 / 4, rel=1e-5)


BAD = [
    ("unknown-label", ["pos", "neg", "meh"], NAMES,
     "--test-data {test}: label(s) 'meh' are not among the labels adapter '{adapter}' was trained on"
     " ('neg', 'neutral', 'pos')"),
    ("old-adapter", ["pos", "neg"], None,
     "adapter '{adapter}' records no label names (exported by an older fedlora): pass the run's training"
     " file as --data"),
]


@pytest.mark.parametrize("case, rows, labels, message", BAD, ids=[case for case, *_ in BAD])
def test_an_unknown_test_label_or_an_adapter_without_names_is_one_line(tiny_bert_dir, tmp_path, capsys,
                                                                       case, rows, labels, message):
    # Prepare: as many labels as the adapter's, one not its own; or an adapter exported without names
    adapter = _adapter(tiny_bert_dir, tmp_path / "adapter", labels)
    test = _csv(tmp_path / "test.csv", rows)
    capsys.readouterr()  # transformers' loading bars
    # Execute
    code = _eval(tiny_bert_dir, tmp_path, "--adapter", str(adapter), "--test-data", str(test))
    # Assert: exit 2, one line naming the label and the adapter's labels (or saying to pass --data)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message.format(test=test, adapter=adapter) in err[0], err
    assert not (tmp_path / "e").exists()


def test_with_data_an_old_adapter_still_scores_and_one_of_other_labels_is_refused(tiny_bert_dir, tmp_path,
                                                                                 capsys):
    # Prepare: the run's training file (its sorted labels: NAMES); adapters without names and with others
    data = _csv(tmp_path / "train.csv", NAMES * 4)
    test = _csv(tmp_path / "test.csv", ["pos", "neutral", "pos", "pos"])
    old = _adapter(tiny_bert_dir, tmp_path / "old", None)
    other = _adapter(tiny_bert_dir, tmp_path / "other", ["a", "b", "c"])
    capsys.readouterr()  # transformers' loading bars
    # Execute
    ok = _eval(tiny_bert_dir, tmp_path, "--adapter", str(old), "--data", str(data), "--test-data", str(test))
    (got,) = json.loads((tmp_path / "e" / "eval.json").read_text())["results"]
    code = _eval(tiny_bert_dir, tmp_path / "x", "--adapter", str(other), "--data", str(data), "--test-data",
                 str(test))
    # Assert: --data numbers the labels (3 of 4 right); an adapter of other labels is refused
    assert ok == 0 and got["accuracy"] == 0.75
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"adapter '{other}' was trained on the labels 'a', 'b', 'c', and --data has 'neg'" in err[0]


@pytest.mark.slow  # runs fedlora-sim end to end
def test_a_runs_adapter_records_its_label_names_and_scores_a_subset_as_with_data(tiny_bert_dir, tmp_path):
    # Prepare: a 1-round run on labels neg, neutral, pos; a test file of pos and neutral only
    data = _csv(tmp_path / "train.csv", NAMES * 8)
    test = _csv(tmp_path / "test.csv", ["pos", "neutral", "pos"])
    assert sim(["--model", str(tiny_bert_dir), "--data", str(data), "--max-length", "16", "--num-clients",
                "2", "--rounds", "1", "--local-steps", "2", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    adapter = tmp_path / "run" / "adapter"
    # Execute: without --data, and with it
    assert _eval(tiny_bert_dir, tmp_path / "a", "--adapter", str(adapter), "--test-data", str(test)) == 0
    assert _eval(tiny_bert_dir, tmp_path / "b", "--adapter", str(adapter), "--test-data", str(test),
                 "--data", str(data)) == 0
    # Assert: the run's names in id order beside its adapter; the same scores either way
    assert json.loads((adapter / LABELS).read_text()) == NAMES
    rows = [json.loads((tmp_path / d / "e" / "eval.json").read_text())["results"][0] for d in ("a", "b")]
    assert [{k: r[k] for k in ("accuracy", "loss", "eval_examples")} for r in rows] == [
        {k: rows[1][k] for k in ("accuracy", "loss", "eval_examples")}] * 2
