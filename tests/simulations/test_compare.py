"""fedlora-compare: hand-computed summaries, tables and plots, an end-to-end run, one-line refusals."""

from __future__ import annotations

import csv
import json

import pytest

from fedlora.simulations.compare import main
from fedlora.simulations.report import CSV_COLUMNS, markdown_table, plot, summarize, write_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy_per_round.png", "accuracy_vs_bytes.png", "bytes_per_client_round.png")


def _row(rnd, acc, up, down, agg_error, seconds, strategy="fed-sb"):
    return {"round": rnd, "strategy": strategy, "accuracy": acc, "loss": 1.0 - acc,
            "bytes_up": sum(up), "bytes_down": sum(down), "bytes_up_per_client": up,
            "bytes_down_per_client": down, "agg_error": agg_error, "clients": len(up),
            "seconds": seconds}


def _hand_rows():
    """Two clients; round 0 carries a 200 + 400 byte init upload and nothing down."""
    return [_row(0, 0.80, [200, 400], [], None, 1.5),
            _row(1, 0.70, [10, 20], [100, 100], 0.0, 2.0),
            _row(2, 0.60, [20, 30], [70, 70], 1e-7, 2.5)]


def _read_csv(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_summarize_hand_computed():
    # Prepare: rows out of order, to check they are sorted by round
    rows = _hand_rows()[::-1]
    # Execute
    s = summarize(rows, label="fed-sb (test)")
    # Assert: totals include round 0: up 600 + 30 + 50 = 680, down 0 + 200 + 140 = 340;
    # per-client means over rounds 1-2 only: up (10+20+20+30)/4 = 20, down (100+100+70+70)/4 = 85;
    # best accuracy is of rounds ≥ 1 (0.70), not round 0's 0.80; final is round 2's
    assert s == {"run": "fed-sb (test)", "strategy": "fed-sb", "rounds": 2,
                 "final_accuracy": 0.60, "best_accuracy": 0.70,
                 "bytes_up": 680, "bytes_down": 340, "bytes_total": 1020,
                 "bytes_up_per_client_round": 20.0, "bytes_down_per_client_round": 85.0,
                 "final_agg_error": 1e-7, "final_perplexity": None, "final_personal_accuracy": None,
                 "metric": "accuracy", "seconds": 6.0}
    assert summarize(rows)["run"] == "fed-sb"
    assert summarize(rows, wall=7.25)["seconds"] == 7.25  # a measured wall time wins over the rows' sum
    # FedSA-LoRA is measured by its clients' own models: the last round's personal accuracy, a column of
    # its own in the Markdown only when a run has it (the table showed the global accuracy alone)
    personal = summarize([{**r, "personal_accuracy": 0.9} if r["round"] == 2 else r for r in rows])
    assert personal["final_personal_accuracy"] == 0.9
    assert "final personal acc" in markdown_table([s, personal]) and "90.0%" in markdown_table([personal])
    assert "personal" not in markdown_table([s])


def test_a_regressions_correlation_is_a_number_in_the_table_not_a_percentage():
    # Prepare: --task regression's rows, whose headline (accuracy) is the Pearson correlation
    rows = [{**r, "metric": "pearson"} for r in _hand_rows()]
    # Execute
    table = markdown_table([summarize(rows)])
    # Assert: final 0.60 and best 0.70 as correlations; a classifier's as percentages
    assert "| 0.6000 | 0.7000 |" in table and "%" not in table
    assert "| 60.0% | 70.0% |" in markdown_table([summarize(_hand_rows())])


def test_summarize_round_zero_only():
    # Prepare / Execute: a run with no training round
    s = summarize([_row(0, 0.25, [], [], None, 3.0, strategy="fedavg")])
    # Assert: best falls back to round 0, per-client means are undefined
    assert s["best_accuracy"] == 0.25 and s["bytes_total"] == 0
    assert s["bytes_up_per_client_round"] is None and s["bytes_down_per_client_round"] is None


def test_write_table_and_plot_from_hand_rows(tmp_path):
    # Prepare: two runs; fedavg sends 2 x 1500 up and 2 x 3000 down per round
    sb = _hand_rows()
    avg = [_row(0, 0.3, [], [], None, 1.0, "fedavg"), _row(1, 0.5, [1500, 1500], [3000, 3000], 0.02, 1.0,
                                                           "fedavg")]
    summaries = [summarize(avg), summarize(sb, "fed-sb")]
    # Execute
    md, csv_path = write_table(summaries, tmp_path, notes="Same job.")
    written = plot({"fedavg": avg, "fed-sb": sb}, tmp_path)
    # Assert: the Markdown rounds for reading, the CSV keeps exact values
    lines = md.read_text().splitlines()
    assert "| `fedavg` | 50.0% | 50.0% | 3.00 kB | 6.00 kB | 9.00 kB | 1.50 kB | 3.00 kB | 2.00e-02 | 2.0 |" \
        in lines
    assert "| `fed-sb` | 60.0% | 70.0% | 680 B | 340 B | 1.02 kB | 20 B | 85 B | 1.00e-07 | 6.0 |" in lines
    assert lines[-1] == "Same job."
    rows = _read_csv(csv_path)
    assert list(rows[0]) == CSV_COLUMNS and [r["run"] for r in rows] == ["fedavg", "fed-sb"]
    assert rows[1]["bytes_total"] == "1020" and float(rows[1]["final_agg_error"]) == 1e-7
    assert [p.name for p in written] == list(PLOTS) and all(_is_png(p) for p in written)


@pytest.mark.slow
def test_end_to_end(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    # Prepare
    out = tmp_path / "cmp"
    argv = ["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--num-clients", "3", "--rounds", "2",
            "--local-steps", "2", "--batch-size", "4", "--max-length", "16", "--rank", "4",
            "--strategies", "fedavg,flora,fed-sb", "--hetero-ranks", "2,4", "--out", str(out), "--quiet"]
    # Execute
    code = main(argv)
    # Assert: four runs, each in its own folder, same job except strategy, lr and ranks
    assert code == 0 and capsys.readouterr().err == ""
    runs = {"fedavg": "fedavg", "flora": "flora", "fed-sb": "fed-sb", "flora (ranks 2,4)": "flora-ranks-2-4"}
    configs = {label: json.loads((out / folder / "config.json").read_text())
               for label, folder in runs.items()}
    assert {c["seed"] for c in configs.values()} == {0} and {c["rounds"] for c in configs.values()} == {2}
    assert configs["fed-sb"]["lr"] == 1e-2 and configs["fedavg"]["lr"] == 2e-3
    assert configs["flora (ranks 2,4)"]["ranks"] == [2, 4] and configs["flora"]["ranks"] is None
    table = [line for line in (out / "comparison.md").read_text().splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == list(runs)
    # Assert: every CSV figure equals the one recomputed by hand from that run's metrics.jsonl
    csv_rows = _read_csv(out / "comparison.csv")
    assert [r["run"] for r in csv_rows] == list(runs)
    for got in csv_rows:
        rows = [json.loads(x) for x in (out / runs[got["run"]] / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2]
        up = rows[0]["bytes_up"] + rows[1]["bytes_up"] + rows[2]["bytes_up"]
        down = rows[0]["bytes_down"] + rows[1]["bytes_down"] + rows[2]["bytes_down"]
        ups = rows[1]["bytes_up_per_client"] + rows[2]["bytes_up_per_client"]
        downs = rows[1]["bytes_down_per_client"] + rows[2]["bytes_down_per_client"]
        assert len(ups) == len(downs) == 6
        assert got["strategy"] == rows[0]["strategy"]
        assert int(got["bytes_up"]) == up and int(got["bytes_down"]) == down
        assert int(got["bytes_total"]) == up + down
        assert float(got["bytes_up_per_client_round"]) == pytest.approx(sum(ups) / 6, rel=1e-12)
        assert float(got["bytes_down_per_client_round"]) == pytest.approx(sum(downs) / 6, rel=1e-12)
        assert float(got["final_accuracy"]) == rows[2]["accuracy"]
        assert float(got["best_accuracy"]) == max(rows[1]["accuracy"], rows[2]["accuracy"])
        assert float(got["final_agg_error"]) == pytest.approx(rows[2]["agg_error"], rel=1e-12, abs=1e-30)
        # wall s: the measured run, which the rows' seconds (setup, rounds, evaluations) lie inside
        rounds = rows[0]["seconds"] + rows[1]["seconds"] + rows[2]["seconds"]
        assert rounds - 0.003 <= float(got["seconds"]) <= rounds + 2.0
        assert all(r["seconds"] == pytest.approx(r["train_seconds"] + r["eval_seconds"], abs=2e-3)
                   for r in rows)
    # Assert: Fed-SB's init upload is counted; the rank-2/4 clients of flora send different sizes
    by_run = {r["run"]: r for r in csv_rows}
    assert int(by_run["fed-sb"]["bytes_up"]) > int(by_run["fedavg"]["bytes_up"])
    het = [json.loads(x) for x in (out / "flora-ranks-2-4" / "metrics.jsonl").read_text().splitlines()]
    sizes = het[1]["bytes_up_per_client"]
    assert sizes[0] < sizes[1] and sizes[0] == sizes[2]
    assert all(_is_png(out / name) for name in PLOTS)


def test_refuses_unknown_strategy(tmp_path, capsys):
    # Execute: argparse reports a bad --strategies value and exits 2
    with pytest.raises(SystemExit) as exc:
        main(["--strategies", "fedavg,fedprox", "--out", str(tmp_path / "o")])
    # Assert: one line naming the bad strategy; nothing written
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "unknown strategy 'fedprox'" in err and not (tmp_path / "o").exists()


def test_refuses_hetero_ranks_without_a_strategy_that_allows_them(tmp_path, capsys):
    # Execute
    code = main(["--strategies", "fedavg,lora-fair,fed-sb", "--hetero-ranks", "4,8",
                 "--out", str(tmp_path / "o")])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("fedlora-compare: error: --hetero-ranks needs") and "flora" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--strategy", "flora"], "use --strategies flora"),
    (["--hetero-ranks", "4,x"], "takes integers like 4,8,16"),
    (["--strategies", "fedavg,fedavg"], "lists a strategy twice"),
    (["--strategies", "fedavg,flora", "--ranks", "4,8"], "fedavg cannot aggregate"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
])
def test_refuses_other_bad_flags_in_one_line(tmp_path, capsys, argv, expected):
    # Execute: parser errors exit through SystemExit(2), the others return 2
    try:
        code = main([*argv, "--out", str(tmp_path / "o")])
    except SystemExit as exc:
        code = exc.code
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and expected in err


def test_a_missing_data_file_is_one_line_without_the_progress_bar(tiny_bert_dir, tmp_path, capsys):
    # Execute: no --quiet, so the first run's progress bar starts before its data loads
    code = main(["--model", str(tiny_bert_dir), "--data", str(tmp_path / "missing.csv"),
                 "--strategies", "fedavg", "--out", str(tmp_path / "o")])
    # Assert: the refusal alone (the bar's last frame, "fedavg ... 0/300", was printed above it)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and "data file" in err[0], err


def test_refuses_existing_non_empty_out(tmp_path, capsys):
    # Prepare: an earlier comparison's table
    (tmp_path / "comparison.md").write_text("old\n")
    # Execute
    code = main(["--strategies", "fedavg", "--out", str(tmp_path)])
    # Assert: refused in one line, the old file kept
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "--overwrite" in err
    assert (tmp_path / "comparison.md").read_text() == "old\n"


def test_overwrite_removes_the_replaced_comparisons_runs_and_no_other_files(tmp_path):
    from fedlora.job.schema import JobConfig
    from fedlora.simulations.compare import _clear

    # Prepare: an earlier grid of two runs (its table names them), their TensorBoard folders, and a
    # file of the user's own
    out = tmp_path / "cmp"
    for run in ("fedavg", "flora-int8"):
        (out / run).mkdir(parents=True)
        (out / run / "metrics.jsonl").write_text("{}\n")
        (out / "tensorboard" / run).mkdir(parents=True)
        (out / "tensorboard" / run / "events.out.tfevents.1").write_text("x")
    (out / "comparison.csv").write_text("run,strategy\nfedavg,fedavg\nflora-int8,flora\n")
    (out / "perplexity_per_round.png").write_bytes(PNG_MAGIC)  # its runs were sft: a fourth plot
    (out / "notes.txt").write_text("mine\n")
    # Execute: a new comparison of fedavg alone replaces it (once its first run's job is set up)
    _clear(out, [("fedavg", JobConfig())])
    # Assert: the run it does not repeat is gone whole (it stood beside the new table), fedavg's rows go
    # (its run writes them anew), the table and every plot go, the user's file stays
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "notes.txt", "tensorboard/fedavg/events.out.tfevents.1"]
