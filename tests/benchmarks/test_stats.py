"""``benchmarks/stats.py``: tails, mean ± sd over seeds, and when a difference counts."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
stats = load_script("stats", "bench_stats")


@pytest.mark.parametrize("trained, tail", [(1, 1), (2, 1), (10, 3), (20, 5), (100, 5)])
def test_the_tail_is_a_quarter_of_the_rounds_within_one_and_five(trained, tail):
    assert stats.tail_rounds(trained) == tail


def test_tail_mean_skips_round_zero_and_averages_the_last_rounds():
    # 20 trained rounds at 0.80 … then a dip in the last: the tail is rounds 16-20
    rows = [{"round": 0, "accuracy": 0.1}] + [{"round": r, "accuracy": 0.9} for r in range(1, 20)]
    rows.append({"round": 20, "accuracy": 0.5})
    assert stats.tail_mean(rows) == pytest.approx((4 * 0.9 + 0.5) / 5)


def test_tail_mean_averages_the_scored_rounds_of_the_tail():
    # 20 rounds scored every 2nd (--eval-every 2): the tail's rounds 16-20 hold scores at 16, 18, 20
    rows = [{"round": r, "accuracy": (0.5 + r / 100 if r % 2 == 0 else None)} for r in range(21)]
    assert stats.tail_mean(rows) == pytest.approx((0.66 + 0.68 + 0.70) / 3)


def test_mean_and_sample_sd_in_points():
    assert stats.mean_sd([0.80, 0.82, 0.84]) == "82.0 ± 2.0%"
    assert stats.mean_sd([0.8]) == "80.0%" and stats.mean_sd([]) == "—"


def test_a_difference_within_its_spread_is_no_difference():
    # paired gaps +3, +1, +2 points: mean +2, sd 1 -> a difference
    assert stats.difference([0.83, 0.81, 0.82], [0.80, 0.80, 0.80]) == "+2.0 ± 1.0 pts"
    # gaps +3, -1, +1: mean +1, sd 2 -> no difference; one seed has no spread
    assert stats.difference([0.83, 0.79, 0.81], [0.80, 0.80, 0.80]) == "no difference (+1.0 ± 2.0 pts)"
    assert stats.difference([0.9], [0.8]) == "no difference (+10.0 pts)"


def test_read_rows_reads_a_runs_metrics_file_and_skips_blank_lines(tmp_path):
    text = '{"round": 0, "accuracy": 0.5}\n\n{"round": 1, "accuracy": 0.75}\n'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert stats.read_rows(tmp_path) == [{"round": 0, "accuracy": 0.5}, {"round": 1, "accuracy": 0.75}]
