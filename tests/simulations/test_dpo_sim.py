"""--task dpo end to end on a tiny chat LLaMA: a plain, a folding and a DP-SGD job, and bad input."""

from __future__ import annotations

import json
import math

import pytest

from fedlora.simulations.cli import main

DPO_FIELDS = {"reward_accuracy", "reward_margin", "answer_accuracy", "loss", "eval_examples"}


def _args(model, data, out, *extra):
    return ["--task", "dpo", "--model", str(model), "--data", str(data), "--out", str(out),
            "--text-column", "sentence", "--label-words", "0=negative,1=positive",
            "--prompt-template", "Review: {text}", "--num-clients", "3", "--rounds", "2",
            "--local-steps", "2", "--batch-size", "4", "--rank", "4", "--max-length", "24", "--lr", "0.05",
            "--quiet", *extra]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--strategy", "flora", "--ranks", "2,4"],
                                   ["--dp", "sample", "--epsilon", "8", "--delta", "1e-3"]],
                         ids=["flora", "fedavg-dp-sample"])
def test_dpo_rows(tiny_chat_llama_dir, sentiment_tsv, tmp_path, extra):
    out = tmp_path / "run"
    assert main(_args(tiny_chat_llama_dir, sentiment_tsv, out, "--dpo-beta", "0.2", *extra)) == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:  # label-word pairs: answer accuracy is the headline
        assert DPO_FIELDS <= set(r) and r["metric"] == "answer_accuracy" == r["metric"]
        assert r["accuracy"] == r["answer_accuracy"] and r["eval_examples"] == 24
    # before training the policy is the reference: every margin is 0 and the loss is log 2
    assert (rows[0]["reward_margin"], rows[0]["reward_accuracy"]) == (0.0, 0.0)
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    if "--dp" not in extra:
        assert rows[-1]["reward_margin"] > 0 and rows[-1]["loss"] < math.log(2)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"


def test_dpo_without_pairs_is_one_line_and_writes_nothing(tiny_chat_llama_dir, tmp_path, capsys):
    # Prepare: instruction data (prompt/response), which has no rejected response
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "ok"}) + "\n" for i in range(9)))
    out = tmp_path / "o"
    # Execute
    code = main(_args(tiny_chat_llama_dir, data, out, "--label-words", "", "--prompt-template", ""))
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sft.jsonl has no chosen/rejected columns" in err[0], err
    assert not out.exists()
