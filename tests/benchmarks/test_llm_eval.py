"""benchmarks/llm_eval.py's DPO study on a tiny model and a tiny SST-2-like folder (its smoke path)."""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_scripts import BENCHMARKS, load_script


@pytest.mark.slow
def test_sst2_dpo_study_reports_round_0_and_the_last_of_each_strategy(tiny_chat_llama_dir, tmp_path,
                                                                       monkeypatch, capsys):
    # Prepare: SST-2's two files, keyword-labelled (train: sentence, dev: content)
    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    for name, column, n in (("train.tsv", "sentence", 60), ("dev.tsv", "content", 12)):
        rows = [f"{i % 2}\t{'great' if i % 2 else 'awful'} film {i}" for i in range(n)]
        (sst2 / name).write_text("\n".join([f"label\t{column}", *rows]) + "\n")
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # llm_sft.py imports stats.py
    llm_eval = load_script("llm_eval")
    # Execute: 40 sampled phrases over 10 clients, one round of one step, 8 dev sentences
    argv = ["--studies", "sst2-dpo", "--model", str(tiny_chat_llama_dir), "--sst2", str(sst2),
            "--out", str(tmp_path / "out"), "--dpo-train", "40", "--dpo-rounds", "1", "--dpo-steps", "1",
            "--eval-max", "8", "--dpo-sft-weights", "0,1"]
    assert llm_eval.main(argv) == 0
    # Assert: the sample, and a table row for round 0 and round 1 of FedAvg and FLoRA, each α
    assert len((tmp_path / "out" / "sst2-dpo" / "train.tsv").read_text().splitlines()) == 41
    table = capsys.readouterr().out
    for strategy in llm_eval.DPO_STRATEGIES.split(","):
        for alpha in ("0", "1"):
            for rnd in (0, 1):
                assert f"| {strategy}, α {alpha}, round {rnd} |" in table
    assert "| fedavg, α 0, round 0 | 0.0% | 0.0% | 0.000 | 0.693 | 8 |" in table  # zero-shot: the reference
    # α = 1 trains on the chosen answers too: its round 1 is not plain DPO's
    plain, rpo = (next(line for line in table.splitlines() if line.startswith(f"| fedavg, α {a}, round 1"))
                  for a in ("0", "1"))
    assert plain != rpo


def test_dpo_split_samples_pairs_from_the_private_part_and_scores_on_validation(tmp_path, monkeypatch):
    # Prepare: 200 independent SST-2-like sentences (each its own root)
    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    for name, column, n in (("train.tsv", "sentence", 200), ("dev.tsv", "content", 4)):
        rows = [f"{i % 2}\t{'great' if i % 2 else 'awful'} film number{i}" for i in range(n)]
        (sst2 / name).write_text("\n".join([f"label\t{column}", *rows]) + "\n")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    llm_eval = load_script("llm_eval")
    args = llm_eval.argparse.Namespace(sst2=sst2, out=tmp_path / "out", dpo_split=False, dpo_eval_on="dev")
    # Execute: the three data choices
    whole = llm_eval.dpo_data(args)
    args.dpo_eval_on = "validation"
    source, test, root = llm_eval.dpo_data(args)
    args.dpo_eval_on, args.dpo_split = "dev", True
    split_dev = llm_eval.dpo_data(args)
    # Assert: the old study is untouched; the split's runs sample the private part, held out on
    # validation (3 + 20 of the 200 roots public / validation) or on dev
    dev = ["--test-data", str(sst2 / "dev.tsv"), "--test-text-column", "content"]
    assert whole == (sst2 / "train.tsv", dev, tmp_path / "out" / "sst2-dpo")
    data = tmp_path / "out" / "data"
    assert (source, root) == (data / "private.tsv", tmp_path / "out" / "sst2-dpo-split-validation")
    assert test == ["--test-data", str(data / "validation.tsv"), "--test-text-column", "sentence"]
    assert split_dev == (data / "private.tsv", dev, tmp_path / "out" / "sst2-dpo-split-dev")
    private = set(source.read_text().splitlines()[1:])
    validation = set((data / "validation.tsv").read_text().splitlines()[1:])
    assert (len(private), len(validation)) == (177, 20) and not private & validation


def test_dpo_report_marks_unscored_rounds(monkeypatch):
    # Prepare: round 0 of an --eval-every 0 run (no scores) and its scored last round
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    llm_eval = load_script("llm_eval")
    rows = [{"model": "fedavg, α 1, round 0", "loss": None, "train_seconds": 94.0},
            {"model": "fedavg, α 1, round 2", "answer_accuracy": 0.846, "reward_accuracy": 0.834,
             "reward_margin": 0.153, "loss": 0.622, "eval_examples": 872, "train_seconds": 98.0}]
    # Execute
    table = llm_eval.dpo_report({"command": "c", "seconds": 1.0, "rows": rows}).splitlines()
    # Assert
    assert table[-2] == "| fedavg, α 1, round 0 | — | — | — | — | — | 94 |"
    assert table[-1] == "| fedavg, α 1, round 2 | 84.6% | 83.4% | 0.153 | 0.622 | 872 | 98 |"
