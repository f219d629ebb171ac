"""--init-adapter: a job starts from an exported adapter folded into its base (SFT, then DPO or more
rounds), and its export is the whole update from the base."""

from __future__ import annotations

import json

import pytest

from fedlora.simulations.cli import main as sim
from fedlora.simulations.evaluate import main as evaluate

pytestmark = pytest.mark.slow  # CLI runs end to end

SFT = ["--task", "sft", "--text-column", "sentence", "--label-words", "0=negative,1=positive",
       "--prompt-template", "Review: {text}", "--max-length", "24", "--num-clients", "2",
       "--local-steps", "2", "--batch-size", "4", "--rank", "4", "--lr", "0.01", "--quiet"]


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("base", [[], ["--quantize", "nf4"]], ids=["fp32", "nf4"])
def test_a_run_from_an_adapter_starts_where_it_ended_and_exports_both(tiny_chat_llama_dir, sentiment_tsv,
                                                                       tmp_path, base):
    # Prepare: a 2-round SFT run
    if base:
        pytest.importorskip("bitsandbytes")
    job = [*SFT, "--model", str(tiny_chat_llama_dir), "--data", str(sentiment_tsv), *base]
    assert sim([*job, "--rounds", "2", "--out", str(tmp_path / "sft")]) == 0
    # Execute: one more round of another strategy from its adapter
    assert sim([*job, "--rounds", "1", "--strategy", "flora", "--init-adapter",
                str(tmp_path / "sft" / "adapter"), "--out", str(tmp_path / "more")]) == 0
    # Assert: round 0 is the first run's last model; the export (both updates) is the second's last
    first, more = _rows(tmp_path / "sft"), _rows(tmp_path / "more")
    keys = ("accuracy", "loss", "answer_accuracy")
    assert {k: more[0][k] for k in keys} == pytest.approx({k: first[-1][k] for k in keys}, abs=1e-6)
    assert more[1]["loss"] != more[0]["loss"]
    assert evaluate(["--config", str(tmp_path / "more" / "config.json"), "--adapter",
                     str(tmp_path / "more" / "adapter"), "--out", str(tmp_path / "e"), "--quiet"]) == 0
    (got,) = json.loads((tmp_path / "e" / "eval.json").read_text())["results"]
    assert got["loss"] == pytest.approx(more[-1]["loss"], rel=1e-5)
    assert got["answer_accuracy"] == more[-1]["answer_accuracy"]


def test_an_adapter_of_other_layers_or_another_base_is_refused_in_one_line(tiny_chat_llama_dir,
                                                                            tiny_llama_dir, sentiment_tsv,
                                                                            tmp_path, capsys):
    # Prepare: an adapter on every linear layer of the tiny chat LLaMA
    job = [*SFT, "--data", str(sentiment_tsv), "--rounds", "1"]
    assert sim([*job, "--model", str(tiny_chat_llama_dir), "--target-modules", "all-linear",
                "--out", str(tmp_path / "all")]) == 0
    adapter = str(tmp_path / "all" / "adapter")
    capsys.readouterr()
    cases = [([*job, "--model", str(tiny_chat_llama_dir)], "that this job does not: pass --target-modules"
              " down_proj gate_proj k_proj o_proj q_proj up_proj v_proj"),
             ([*job, "--model", str(tiny_llama_dir), "--chat-template", "plain", "--target-modules",
               "all-linear"], "was trained on"),
             ([*job, "--model", str(tiny_chat_llama_dir), "--target-modules", "all-linear", "--strategy",
               "flora", "--quantize", "nf4", "--fold-rank", "2"],
              "--fold-rank would truncate --init-adapter's update")]
    for argv, message in cases:
        # Execute
        code = sim([*argv, "--init-adapter", adapter, "--out", str(tmp_path / "bad")])
        # Assert
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0]


def test_an_adapters_head_of_other_labels_is_refused_unless_a_new_head_starts(tiny_bert_dir, tiny_csv,
                                                                               tmp_path, capsys):
    # Prepare: a classifier run on labels 0, 1, 2; data of three other labels, and of two
    job = ["--model", str(tiny_bert_dir), "--num-clients", "2", "--rounds", "1", "--local-steps", "1",
           "--batch-size", "4", "--max-length", "16", "--quiet"]
    assert sim([*job, "--data", str(tiny_csv), "--out", str(tmp_path / "first")]) == 0
    rows = tiny_csv.read_text().splitlines()[1:]
    renamed, two = tmp_path / "xyz.csv", tmp_path / "two.csv"
    renamed.write_text("text,label\n" + "".join(f"{r[:-1]}{'xyz'[int(r[-1])]}\n" for r in rows))
    two.write_text("text,label\n" + "".join(f"{r}\n" for r in rows if not r.endswith("2")))
    adapter = ["--init-adapter", str(tmp_path / "first" / "adapter")]
    capsys.readouterr()
    for data, had in ((renamed, "'x', 'y', 'z'"), (two, "'0', '1'")):
        # Execute: as it is (its head was copied to other labels, or failed with a shape error), and
        # with --head zero
        code = sim([*job, "--data", str(data), *adapter, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip().splitlines()
        fresh = sim([*job, "--data", str(data), *adapter, "--head", "zero", "--out",
                     str(tmp_path / data.stem)])
        # Assert
        assert code == 2 and not (tmp_path / "bad").exists()  # (two labels: a note on the base's head first)
        assert len(err) == 1 or (len(err) == 2 and "replaced by a new, randomly initialised head" in err[0])
        assert "holds a head trained on the labels '0', '1', '2', and this job's data has" in err[-1]
        assert had in err[-1] and "pass --head zero" in err[-1]
        assert fresh == 0
