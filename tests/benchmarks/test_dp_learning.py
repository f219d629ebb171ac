"""``benchmarks/dp_learning.py``'s table over seeds, rebuilt from finished runs (``--report-only``)."""

from __future__ import annotations

import json

from bench_scripts import load_script

dp_learning = load_script("dp_learning")

#: Final accuracy of each finished run: ε = 8 and no DP, seeds 0 and 1.
FINALS = {("8", 0): 0.80, ("8", 1): 0.82, ("inf", 0): 0.85, ("inf", 1): 0.88}


def finished_run(folder, final: float) -> None:
    """A run folder as ``fedlora-sim`` leaves it: rows of round 0 and 1, its config and adapter."""
    (folder / "adapter").mkdir(parents=True)
    rows = [{"round": 0, "accuracy": 0.5}, {"round": 1, "accuracy": final}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.json").write_text(json.dumps({"rounds": 1, "local_steps": 2, "lr": 3e-3,
                                                    "max_grad_norm": 0.1}))


def test_seeds_table_gives_mean_sd_and_the_paired_gap_to_no_dp(tmp_path, monkeypatch, capsys):
    # Prepare: a tiny SST-2 folder and four finished runs in OUT/<strategy>-eps<ε>/seed<k>/
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    phrases = "".join(f"{i % 2}\tphrase {i}\n" for i in range(20))
    (sst2 / "train.tsv").write_text("label\tsentence\n" + phrases)
    for (eps, seed), final in FINALS.items():
        finished_run(tmp_path / "out" / f"fedavg-eps{eps}" / f"seed{seed}", final)
    # Execute
    argv = ["--data-dir", str(sst2), "--out", str(tmp_path / "out"), "--strategies", "fedavg",
            "--epsilons", "8,inf", "--seeds", "0,1", "--report-only"]
    assert dp_learning.main(argv) == 0
    out = capsys.readouterr().out
    # Assert: one row per run, then mean ± sd (sample sd of 0.80, 0.82: 1.4 points) and the
    # paired gap: (0.80 - 0.85, 0.82 - 0.88) = (-5, -6) points, mean -5.5, sd 0.7
    assert "| fedavg | 8 | 1 | 82.0% |" in out and "| fedavg | inf | 0 | 85.0% |" in out
    assert "| fedavg | 8 | 2 | 81.0 ± 1.4% | -5.5 ± 0.7 pts |" in out
    assert "| fedavg | inf | 2 | 86.5 ± 2.1% | — |" in out
