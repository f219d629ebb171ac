"""``fedlora-sim --task regression`` end to end on an STS-B-like file whose score is a known function of
the text: the correlation rises over rounds, and fedlora-eval scores the export as the run did."""

from __future__ import annotations

import json

import pytest

from fedlora.simulations.cli import main as sim
from fedlora.simulations.evaluate import main as evaluate

pytestmark = pytest.mark.slow  # runs the CLIs end to end

SHARED = ["--task", "regression", "--text-column", "sentence1+sentence2", "--label-column", "score",
          "--max-length", "16"]


def test_a_tiny_model_learns_the_scores_and_fedlora_eval_reproduces_its_last_round(tiny_bert_dir, stsb_tsv,
                                                                                  tmp_path, capsys):
    # Prepare: 3 IID clients, 6 rounds of 10 steps (lr 2e-2: the head's bias must reach scores of 0.5-4.7)
    data = ["--model", str(tiny_bert_dir), "--data", str(stsb_tsv), *SHARED]
    run = tmp_path / "run"
    # Execute
    assert sim([*data, "--out", str(run), "--num-clients", "3", "--rounds", "6", "--local-steps", "10",
                "--batch-size", "8", "--rank", "4", "--lr", "2e-2", "--quiet"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert evaluate([*data, "--adapter", str(run / "adapter"), "--out", str(tmp_path / "eval")]) == 0
    scored = json.loads((tmp_path / "eval" / "eval.json").read_text())
    # Assert: Pearson is the headline; it rises from the random model's and the error falls
    assert all(r["metric"] == "pearson" and r["accuracy"] == r["pearson"] for r in rows)
    assert rows[-1]["pearson"] > 0.6 and rows[-1]["pearson"] > rows[0]["pearson"] + 0.3
    assert rows[-1]["mse"] < rows[0]["mse"] / 4 and rows[-1]["spearman"] > 0.5
    # fedlora-eval of the export: the run's last row
    row = scored["results"][0]
    for key in ("pearson", "spearman", "mse", "loss"):
        assert row[key] == pytest.approx(rows[-1][key], abs=1e-6)
    # a classifier is refused this adapter in one line
    capsys.readouterr()
    assert evaluate([*data, "--task", "classification", "--adapter", str(run / "adapter"),
                     "--out", str(tmp_path / "cls")]) == 2
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "was trained by --task regression" in said
