"""benchmarks/llm_sft.py's table: which runs it starts, and how it pairs them with centralized runs.

The runs themselves (SmolLM2 for minutes each) are replaced by rows written here by hand.
"""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.bench_scripts import load_script

llm_sft = load_script("llm_sft")

#: final answer accuracy of each run, by (folder, seed); FedSA-LoRA's clients' own models beside it
FINAL = {("centralized-bf16", 0): 0.86, ("centralized-bf16", 1): 0.88,
         ("iid-fedavg-bf16", 0): 0.85, ("iid-fedavg-bf16", 1): 0.86,
         ("iid-fedsa-lora-bf16", 0): 0.15, ("iid-fedsa-lora-bf16", 1): 0.15}
PERSONAL = {0: 0.90, 1: 0.92}


@pytest.fixture
def calls(monkeypatch):
    """Every run the script asks for, as ``(folder name, seed, flags)``; each returns rows by hand."""
    seen = []

    def fake_run(out, flags, rounds, finished_only=False):
        seed = int(flags[flags.index("--seed") + 1])
        if finished_only and (out.name, seed) not in FINAL:  # a run not finished: left out
            return None, None
        seen.append((out.name, seed, flags))
        final = FINAL[out.name, seed]
        rows = [{"round": r, "answer_accuracy": a, "perplexity": 1.2, "train_seconds": 1.0,
                 "eval_seconds": 1.0} for r, a in enumerate([0.15, final - 0.02, final][:rounds + 1])]
        if flags[flags.index("--eval-every") + 1] == "0":  # only the last round scored
            for r in rows[:-1]:
                r["answer_accuracy"], r["eval_seconds"] = None, 0.0
        if "--personal-test-fraction" in flags:
            rows[-1].update(personal_accuracy=PERSONAL[seed], personal_examples=670)
        return rows, None

    monkeypatch.setattr(llm_sft, "run", fake_run)
    return seen


def test_centralized_runs_on_each_base_and_a_personal_strategy_scores_its_clients(calls, tmp_path, capsys):
    # Prepare: an SST-2 folder (the runs are faked, so only its existence is read)
    (tmp_path / "train.tsv").write_text("label\tsentence\n")
    argv = ["--sst2", str(tmp_path), "--out", str(tmp_path / "out"), "--bases", "bf16", "--partitions", "iid",
            "--strategies", "fedavg,fedsa-lora", "--seeds", "0,1"]
    # Execute
    assert llm_sft.main(argv) == 0
    # Assert: per seed, the centralized run on the same bf16 base (100 steps, one client), then each strategy
    assert [(name, seed) for name, seed, _ in calls] == [
        ("centralized-bf16", 0), ("iid-fedavg-bf16", 0), ("iid-fedsa-lora-bf16", 0),
        ("centralized-bf16", 1), ("iid-fedavg-bf16", 1), ("iid-fedsa-lora-bf16", 1)]
    for name, _, flags in calls:
        assert flags[flags.index("--precision") + 1] == "bf16"
        assert ("--personal-test-fraction" in flags) == (name == "iid-fedsa-lora-bf16")
    central = calls[0][2]
    assert central[central.index("--num-clients") + 1] == "1"
    assert central[central.index("--local-steps") + 1] == "100"
    # the summary pairs each seed with its own centralized run: fedavg −1 and −2 points
    out = capsys.readouterr().out
    assert "| 10 clients, iid | fedavg, bf16 base | 2 | 85.5 ± 0.7% | 85.5 ± 0.7% | -1.5 ± 0.7 pts |" in out
    assert ("| 10 clients, iid | fedsa-lora, bf16 base (clients' own models: 91.0 ± 1.4%) | 2 | 15.0 ± 0.0% |"
            in out)
    assert ("fedsa-lora, bf16 base, seed 1 (global = base; clients' own models: 92.0% of 670 own phrases)"
            in out)


def test_every_registered_strategy_is_the_default():
    assert llm_sft.STRATEGIES[0] == "fedavg" and len(llm_sft.STRATEGIES) == 9


def test_eval_every_zero_scores_the_last_round_only_and_the_table_says_which(calls, tmp_path, capsys):
    (tmp_path / "train.tsv").write_text("label\tsentence\n")
    argv = ["--sst2", str(tmp_path), "--out", str(tmp_path / "out"), "--bases", "bf16", "--partitions", "iid",
            "--strategies", "fedavg", "--eval-every", "0"]
    assert llm_sft.main(argv) == 0
    # every run (the centralized one too) is asked to score its last round only
    assert all(flags[flags.index("--eval-every") + 1] == "0" for _, _, flags in calls)
    # rounds 0 and 1 unscored: "—"; the final and tail columns are round 2's; eval seconds its alone
    out = capsys.readouterr().out
    row = "| 10 clients, iid | fedavg, bf16 base, seed 0 | — / — / 85.0% | **85.0%** | 85.0% | -1.0% |"
    assert row in out
    assert "| 1 + 1 |" in out


def test_another_schedule_runs_in_its_own_folders(calls, tmp_path, monkeypatch):
    # Prepare: 2 rounds of 5 local steps, against the default 2 of 10
    (tmp_path / "train.tsv").write_text("label\tsentence\n")
    monkeypatch.setitem(FINAL, ("centralized-bf16", 2), 0.8)
    monkeypatch.setitem(FINAL, ("dirichlet-flora-bf16", 2), 0.8)
    argv = ["--sst2", str(tmp_path), "--out", str(tmp_path / "out"), "--bases", "bf16", "--partitions",
            "dirichlet", "--strategies", "flora", "--rounds", "2", "--local-steps", "5", "--seeds", "2"]
    # Execute
    assert llm_sft.main(argv) == 0
    # Assert: neither run can reuse or overwrite a default-schedule run; centralized takes 5 × 10 steps
    assert [name for name, _, _ in calls] == ["centralized-bf16", "dirichlet-flora-bf16"]
    central = calls[0][2]
    assert central[central.index("--local-steps") + 1] == "50"
    args = llm_sft.parse(argv)
    assert llm_sft.seed_root(args, 2) == tmp_path / "out" / "seed2" / "rounds2-steps5-clients10"


def test_a_finished_run_of_more_rounds_is_refused_not_overwritten(tmp_path):
    # Prepare: a finished 4-round run in the folder a 2-round job would use
    out = tmp_path / "iid-fedavg-bf16"
    out.mkdir()
    lines = [json.dumps({"round": r, "answer_accuracy": 0.8}) for r in range(5)]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = (out / "metrics.jsonl").read_text()
    # Execute / Assert: one line naming the folder and both round counts; the run is kept
    with pytest.raises(SystemExit, match="holds a run of 4 rounds, not 2"):
        llm_sft.run(out, [], 2)
    assert (out / "metrics.jsonl").read_text() == before


def test_no_centralized_runs_none_but_compares_with_a_finished_one(calls, tmp_path, capsys):
    # Prepare: a finished 2-round centralized run (final 86%) in seed 0's folder
    (tmp_path / "train.tsv").write_text("label\tsentence\n")
    central = tmp_path / "out" / "centralized-bf16"
    central.mkdir(parents=True)
    rows = [{"round": r, "answer_accuracy": a} for r, a in enumerate([0.15, 0.8, 0.86])]
    (central / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--sst2", str(tmp_path), "--out", str(tmp_path / "out"), "--bases", "bf16", "--partitions", "iid",
            "--strategies", "fedavg", "--no-centralized"]
    # Execute
    assert llm_sft.main(argv) == 0
    # Assert: only the federated run ran, and its row says −1 point against the finished 86%
    assert [name for name, _, _ in calls] == ["iid-fedavg-bf16"]
    assert "| **85.0%** | 85.0% | -1.0% |" in capsys.readouterr().out
    # without a finished centralized run the column stays empty
    central.joinpath("metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert llm_sft.main(argv) == 0
    assert "| **85.0%** | 85.0% |  |" in capsys.readouterr().out


def test_centralized_flags_run_the_baseline_in_its_own_folder(calls, tmp_path, monkeypatch):
    (tmp_path / "train.tsv").write_text("label\tsentence\n")
    monkeypatch.setitem(FINAL, ("centralized-bf16-lr4e-3", 0), 0.9)
    argv = ["--sst2", str(tmp_path), "--out", str(tmp_path / "out"), "--bases", "bf16", "--partitions", "iid",
            "--strategies", "fedavg", "--centralized-flags", "--lr 4e-3", "--centralized-tag", "lr4e-3"]
    assert llm_sft.main(argv) == 0
    name, _, flags = calls[0]
    assert name == "centralized-bf16-lr4e-3" and flags[-2:] == ["--lr", "4e-3"]
    assert "--lr" not in calls[1][2]            # the federated run keeps the strategy's lr
    with pytest.raises(SystemExit, match="--centralized-flags needs --centralized-tag"):
        llm_sft.parse(argv[:-2])


def test_finished_only_leaves_out_a_missing_run_and_pairs_the_rest_by_seed(calls, tmp_path, capsys,
                                                                           monkeypatch):
    # Prepare: seed 1's FedAvg run is not finished
    (tmp_path / "train.tsv").write_text("label\tsentence\n")
    monkeypatch.delitem(FINAL, ("iid-fedavg-bf16", 1))
    argv = ["--sst2", str(tmp_path), "--out", str(tmp_path / "out"), "--bases", "bf16", "--partitions", "iid",
            "--strategies", "fedavg", "--seeds", "0,1", "--finished-only"]
    # Execute
    assert llm_sft.main(argv) == 0
    # Assert: FedAvg's summary holds seed 0 alone, paired with seed 0's centralized run (85 − 86)
    out = capsys.readouterr().out
    assert [name for name, _, _ in calls] == ["centralized-bf16", "iid-fedavg-bf16", "centralized-bf16"]
    assert "| 10 clients, iid | fedavg, bf16 base | 1 | 85.0% | 85.0% | no difference (-1.0 pts) |" in out


def test_against_pairs_each_run_with_its_plain_twin_on_that_base_seed_by_seed(calls, tmp_path, capsys,
                                                                              monkeypatch):
    # Prepare: corrected nf4 runs (85%, 84%) and finished plain bf16 runs of the same seeds (86%, 86%)
    (tmp_path / "train.tsv").write_text("label\tsentence\n")
    monkeypatch.setitem(FINAL, ("iid-fedavg-nf4-qc8", 0), 0.85)
    monkeypatch.setitem(FINAL, ("iid-fedavg-nf4-qc8", 1), 0.84)
    for folder in (tmp_path / "out" / "iid-fedavg-bf16", tmp_path / "out" / "seed1" / "iid-fedavg-bf16"):
        folder.mkdir(parents=True)
        rows = [{"round": r, "answer_accuracy": a} for r, a in enumerate([0.15, 0.8, 0.86])]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--sst2", str(tmp_path), "--out", str(tmp_path / "out"), "--bases", "nf4", "--partitions", "iid",
            "--strategies", "fedavg", "--seeds", "0,1", "--no-centralized", "--job-flags",
            "--quant-correction 8", "--tag", "qc8", "--against", "bf16"]
    # Execute
    assert llm_sft.main(argv) == 0
    # Assert: only the corrected runs ran; the summary's last column is 85 − 86 and 84 − 86 points
    assert [name for name, _, _ in calls] == ["iid-fedavg-nf4-qc8", "iid-fedavg-nf4-qc8"]
    out = capsys.readouterr().out
    assert "| tail vs centralized | tail vs bf16 |" in out
    assert ("| 10 clients, iid | fedavg, nf4 base (--quant-correction 8) | 2 | 84.5 ± 0.7% | 84.5 ± 0.7% |"
            " — | -1.5 ± 0.7 pts |") in out
