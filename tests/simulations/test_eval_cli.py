"""fedlora-eval reproduces a run's metrics from its exported adapter (and the base, round 0's);
--eval mc and --metric in a run's rows; one-line refusals."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from fedlora.simulations.cli import main as sim
from fedlora.simulations.evaluate import main as evaluate

pytestmark = pytest.mark.slow  # runs the CLIs end to end

#: The data and model flags a run and fedlora-eval share.
SHARED = ["--task", "sft", "--text-column", "sentence", "--label-words", "0=negative,1=positive",
          "--prompt-template", "Review: {text}", "--max-length", "24", "--eval-batch-size", "8"]


def _run(model, data, out, *extra):
    argv = [*SHARED, "--model", str(model), "--data", str(data), "--out", str(out), "--num-clients", "3",
            "--rounds", "1", "--local-steps", "2", "--batch-size", "4", "--rank", "4", "--quiet", *extra]
    assert sim(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_chat_llama_dir, sentiment_tsv, tmp_path_factory):
    """A 1-round run scored as multiple choice, and one scored by generated answers (ROUGE-L)."""
    root = tmp_path_factory.mktemp("eval-runs")
    return {"mc": (root / "mc", _run(tiny_chat_llama_dir, sentiment_tsv, root / "mc", "--eval", "mc")),
            "generate": (root / "gen", _run(tiny_chat_llama_dir, sentiment_tsv, root / "gen",
                                            "--metric", "rouge-l"))}


def test_rows_name_their_headline_metric(runs):
    for row in runs["mc"][1]:
        assert row["metric"] == "mc_accuracy" and row["accuracy"] == row["mc_accuracy"]
        assert 0 <= row["mc_accuracy_norm"] <= 1 and row["eval_examples"] == 24
        assert "answer_accuracy" not in row
    for row in runs["generate"][1]:
        assert row["metric"] == "rouge_l" and row["accuracy"] == row["rouge_l"]
        assert 0 <= row["answer_accuracy"] <= 1                          # exact match, beside it


@pytest.mark.parametrize("kind", ["mc", "generate"])
def test_eval_reproduces_the_runs_last_round_and_the_base_its_round_0(runs, tiny_chat_llama_dir,
                                                                     sentiment_tsv, tmp_path, capsys, kind):
    # Prepare: the run's folder and rows
    folder, rows = runs[kind]
    extra = ["--eval", "mc"] if kind == "mc" else ["--metric", "rouge-l"]
    # Execute: the base and the run's adapter on the run's held-out split (same --data, --seed)
    code = evaluate([*SHARED, "--model", str(tiny_chat_llama_dir), "--data", str(sentiment_tsv), *extra,
                     "--base", "--adapter", str(folder / "adapter"), "--out", str(tmp_path / "e"), "--quiet"])
    # Assert: the run's figures exactly; one table on stdout; eval.json
    assert code == 0
    record = json.loads((tmp_path / "e" / "eval.json").read_text())
    got = record["results"]
    assert [r["model"] for r in got] == ["base", str(folder / "adapter")]
    # the job as scored: its evaluation fields, not default training fields (rounds 3, ...) it never used
    assert "rounds" not in record["job"] and record["job"]["data"] == str(sentiment_tsv)
    keys = ["metric", "accuracy", "loss", "perplexity", "eval_examples",
            *(["mc_accuracy", "mc_accuracy_norm"] if kind == "mc" else ["answer_accuracy", "rouge_l"])]
    for scored, row in zip(got, [rows[0], rows[-1]], strict=True):
        assert {k: scored[k] for k in keys} == {k: row[k] for k in keys}
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith(f"| model | {rows[0]['metric']} |") and len(table) == 4


@pytest.mark.parametrize("model", ["tiny_bert_dir", "tiny_gpt2_dir"])  # GPT-2: Conv1D, a bias-less head
def test_eval_reproduces_a_classification_run_with_its_head(request, model, tiny_csv, tmp_path):
    # Prepare: a 1-round classification run (its adapter carries the trained head)
    job = ["--model", str(request.getfixturevalue(model)), "--data", str(tiny_csv), "--max-length", "16"]
    assert sim([*job, "--num-clients", "2", "--rounds", "1", "--local-steps", "3", "--out",
                str(tmp_path / "run"), "--quiet"]) == 0
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # Execute: with the job's flags, and with the run's config.json (its training fields left out)
    assert evaluate([*job, "--adapter", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "e"),
                     "--quiet"]) == 0
    assert evaluate(["--config", str(tmp_path / "run" / "config.json"), "--adapter",
                     str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "c"), "--quiet"]) == 0
    # Assert: the run's accuracy and loss, from the adapter's factors and head, either way
    keys = ("metric", "accuracy", "loss", "eval_examples")
    for out in ("e", "c"):
        (got,) = json.loads((tmp_path / out / "eval.json").read_text())["results"]
        assert {k: got[k] for k in keys} == {k: last[k] for k in keys}


def test_a_copy_of_the_base_under_another_name_is_the_same_base(tiny_bert_dir, tiny_csv, tmp_path):
    import shutil

    # Prepare: a 1-round run, then its base copied under another name, and a copy with one file changed
    job = ["--data", str(tiny_csv), "--max-length", "16"]
    assert sim(["--model", str(tiny_bert_dir), *job, "--num-clients", "2", "--rounds", "1", "--local-steps",
                "1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    copy, other = tmp_path / "bert-copy", tmp_path / "bert-other"
    shutil.copytree(tiny_bert_dir, copy)
    shutil.copytree(tiny_bert_dir, other)
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")
    adapter = ["--adapter", str(tmp_path / "run" / "adapter")]
    # Execute / Assert: the copy scores the adapter (it was refused for its name); the changed one is not
    # the base the adapter was trained on
    assert evaluate(["--model", str(copy), *job, *adapter, "--out", str(tmp_path / "e"), "--quiet"]) == 0
    assert evaluate(["--model", str(other), *job, *adapter, "--out", str(tmp_path / "o"), "--quiet"]) == 2


def test_eval_reproduces_each_saved_rounds_row(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: a 2-round run that also exports round 1's adapter (--save-every 1)
    run = tmp_path / "run"
    assert sim(["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--max-length", "16",
                "--num-clients", "2", "--rounds", "2", "--local-steps", "3", "--save-every", "1",
                "--out", str(run), "--quiet"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Execute: each round's adapter, scored with the run's config.json
    assert evaluate(["--config", str(run / "config.json"), "--adapter", str(run / "adapters" / "round-1"),
                     str(run / "adapters" / "round-2"), "--out", str(tmp_path / "e"), "--quiet"]) == 0
    # Assert: rounds 1 and 2's rows
    got = json.loads((tmp_path / "e" / "eval.json").read_text())["results"]
    keys = ("accuracy", "loss", "eval_examples")
    assert [{k: g[k] for k in keys} for g in got] == [{k: r[k] for k in keys} for r in rows[1:]]


@pytest.mark.parametrize("strategy", ["flora", "fedex-lora"])
def test_a_folding_run_with_coded_downloads_exports_the_model_it_scored(strategy, tiny_bert_dir, tiny_csv,
                                                                       tmp_path):
    # Prepare: 2 rounds whose folds travel int8-coded (--compress-down): the model, like every client,
    # folds the coded ones
    run = tmp_path / "run"
    assert sim(["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--max-length", "16", "--strategy",
                strategy, "--num-clients", "2", "--rounds", "2", "--local-steps", "3", "--lr", "0.05",
                "--compress-down", "int8", "--out", str(run), "--quiet"]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    # Execute
    assert evaluate(["--config", str(run / "config.json"), "--adapter", str(run / "adapter"),
                     "--out", str(tmp_path / "e"), "--quiet"]) == 0
    # Assert: the exported adapter is that model, to the rounding of compacting the coded folds (it
    # held the exact folds, which no one had: the loss was 1.8e-5 and 4e-5 off)
    (got,) = json.loads((tmp_path / "e" / "eval.json").read_text())["results"]
    assert got["accuracy"] == last["accuracy"] and got["loss"] == pytest.approx(last["loss"], rel=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eval_reproduces_a_corrected_nf4_run_whose_adapter_carries_the_correction(tiny_chat_llama_dir,
                                                                                   sentiment_tsv, tmp_path,
                                                                                   precision):
    # Prepare: a round over nf4 with a rank-2 --quant-correction (q/v adapted, every layer corrected)
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "run"
    first, last = _run(tiny_chat_llama_dir, sentiment_tsv, run, "--quantize", "nf4", "--quant-correction",
                       "2", "--quant-calibration", str(sentiment_tsv), "--lr", "5e-2", "--precision",
                       precision)
    # Execute: the run's config.json (the adapter holds the correction; --base gets it from the
    # config's --quant-correction and calibration file), and the same adapter on a base without --quantize
    assert evaluate(["--config", str(run / "config.json"), "--base", "--adapter", str(run / "adapter"),
                     "--out", str(tmp_path / "e"), "--quiet"]) == 0
    wrong = evaluate(["--config", str(run / "config.json"), "--quantize", "none", "--quant-correction", "0",
                      "--adapter", str(run / "adapter"), "--out", str(tmp_path / "w"), "--quiet"])
    # Assert: round 0 (the base was the uncorrected nf4 one); the run's answers and loss (in bf16 the
    # run rounded the correction and the adapter's term apart, and the loss was 1.6e-5 off)
    base, got = json.loads((tmp_path / "e" / "eval.json").read_text())["results"]
    assert (base["accuracy"], base["loss"]) == (first["accuracy"], first["loss"])
    assert got["accuracy"] == last["accuracy"] and got["eval_examples"] == last["eval_examples"]
    assert got["loss"] == last["loss"]
    assert wrong == 2 and not (tmp_path / "w").exists()


def test_eval_on_a_test_file_alone(runs, tiny_chat_llama_dir, tmp_path, capsys):
    dev = tmp_path / "dev.tsv"
    dev.write_text("label\tcontent\n" + "".join(f"{i % 2}\t{'great' if i % 2 else 'awful'} film {i}\n"
                                                for i in range(12)))
    code = evaluate([*SHARED, "--model", str(tiny_chat_llama_dir), "--test-data", str(dev),
                     "--test-text-column", "content", "--eval", "mc", "--eval-max", "10",
                     "--out", str(tmp_path / "e"), "--quiet"])
    assert code == 0
    (base,) = json.loads((tmp_path / "e" / "eval.json").read_text())["results"]
    assert base["model"] == "base" and base["eval_examples"] == 10 and base["metric"] == "mc_accuracy"


def _renamed(adapter, tmp_path):
    """A copy of ``adapter`` whose first layer is renamed to one the model lacks."""
    bad = tmp_path / "renamed"
    shutil.copytree(adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    layer = next(k for k in tensors if k.endswith(".lora_A.weight")).removesuffix(".lora_A.weight")
    ghost = "base_model.model.model.layers.7.self_attn.q_proj"
    tensors = {k.replace(layer, ghost): v for k, v in tensors.items()}
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    return bad


def _cut_config(adapter, tmp_path):
    """A copy of ``adapter`` whose adapter_config.json was cut short (a copy interrupted)."""
    bad = tmp_path / "cut"
    shutil.copytree(adapter, bad)
    text = (bad / "adapter_config.json").read_text()
    (bad / "adapter_config.json").write_text(text[: len(text) // 2])
    return bad


BAD = [
    ("classification", "--eval mc scores answers by a causal language model's log-likelihood, and --task"
                       " classification is a sequence-classification model"),
    ("metric", "--metric rouge-l scores generated answers, and --eval mc generates none: drop --metric"),
    ("no-choices", "--eval mc needs choices for every held-out example"),
    ("outside", "mc.jsonl row 3: answer 7 is not among its 2 choices"),
    ("other-base", "was trained on"),
    ("other-targets", "its target module model.layers.7.self_attn.q_proj"),
    ("corrupt-config", "its adapter_config.json is not JSON ("),  # was a JSONDecodeError traceback
]


@pytest.mark.parametrize("case, message", BAD, ids=[case for case, _ in BAD])
def test_bad_input_is_one_line(runs, tiny_chat_llama_dir, tiny_llama_dir, tiny_bert_dir, tiny_csv, tmp_path,
                               capsys, case, message):
    # Prepare: one bad input per case
    adapter = runs["mc"][0] / "adapter"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "ok"}) + "\n" for i in range(10)))
    mc = tmp_path / "mc.jsonl"
    rows = [{"question": f"q{i}", "choices": ["a", "b"], "answer": 7 if i == 2 else 0} for i in range(10)]
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--task", "sft", "--model", str(tiny_chat_llama_dir), "--out", str(tmp_path / "o"), "--quiet"]
    command, argv = {
        "classification": (sim, ["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--eval", "mc",
                                 "--out", str(tmp_path / "o")]),
        "metric": (sim, [*base, "--data", str(pairs), "--eval", "mc", "--metric", "rouge-l"]),
        "no-choices": (evaluate, [*base, "--test-data", str(pairs), "--eval", "mc", "--max-length", "24"]),
        "outside": (sim, [*base, "--data", str(mc), "--eval", "mc", "--max-length", "24"]),
        "other-base": (evaluate, [*base, "--model", str(tiny_llama_dir), "--test-data", str(mc), "--eval",
                                  "mc", "--adapter", str(adapter)]),
        "other-targets": (evaluate, [*base, "--test-data", str(mc), "--eval", "mc",
                                     "--adapter", str(_renamed(adapter, tmp_path))]),
        "corrupt-config": (evaluate, [*base, "--test-data", str(mc), "--eval", "mc",
                                      "--adapter", str(_cut_config(adapter, tmp_path))]),
    }[case]
    # Execute
    code = command(argv)
    # Assert: exit 2, one line naming what is wrong; nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
    if case == "other-base":  # names both: the adapter's base and --model's
        assert str(tiny_chat_llama_dir) in err[0] and str(tiny_llama_dir) in err[0]


def test_the_table_shows_every_answer_metric_as_a_percentage():
    from fedlora.job.evaluate import eval_table
    from fedlora.tasks import ANSWER_METRICS

    # Prepare: a --metric number row (its 0.85 was shown as "0.8", as if a count)
    row = {"model": "base", "adapter": None, "metric": "answer_number", "accuracy": 0.85,
           "answer_accuracy": 0.5, "answer_number": 0.85, "loss": 1.25, "perplexity": 3.49,
           "eval_examples": 20, "seconds": 0.5}
    # Execute
    table = eval_table([row])
    # Assert
    assert table.splitlines()[0] == ("| model | answer_number | answer_accuracy | loss | perplexity |"
                                     " eval_examples | seconds |")
    assert table.splitlines()[2] == "| base | 85.0% | 50.0% | 1.2500 | 3.49 | 20 | 0.5 |"
    for metric in ANSWER_METRICS.values():
        assert eval_table([{**row, "metric": metric.column, metric.column: 0.85}]).splitlines()[2] \
            .startswith("| base | 85.0% |")
