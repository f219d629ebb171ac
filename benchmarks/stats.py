"""How the benchmarks summarise runs: a run's rows, its tail mean, mean ± sd over seeds, and when
a difference counts.

* A run's **rows**: the lines of its ``metrics.jsonl``, one per committed round (round 0 first).

* A run's **tail**: the mean of its last rounds' metric, the last quarter of the trained rounds
  (at most 5, at least 1: the last 5 of 20 rounds, the last 3 of 10, the last of 2), so one
  round's dip or spike does not decide a comparison.
* Over seeds, **mean ± sd** (the sample standard deviation; no ± with one seed).
* A difference between two settings is the mean of the per-seed differences; it is reported as
  **"no difference"** when its size is not larger than their standard deviation (and always with
  one seed, which has no spread to compare it with).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path


def read_rows(folder: str | Path) -> list[dict]:
    """The rows of the run in ``folder`` (its ``metrics.jsonl``, blank lines skipped)."""
    text = (Path(folder) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def tail_rounds(trained: int) -> int:
    """How many last rounds a run's tail averages: a quarter of ``trained``, within [1, 5]."""
    return min(5, max(1, math.ceil(trained / 4)))


def tail_mean(rows: Sequence[dict], key: str = "accuracy") -> float:
    """The mean of ``key`` over the tail of the trained rounds (rows with ``round`` ≥ 1): over
    the rounds of the tail that were scored, when ``--eval-every`` skipped some (the last round
    always is)."""
    trained = [r for r in rows if r["round"] >= 1]
    if not trained:
        raise ValueError("no trained round")
    tail = [r[key] for r in trained[-tail_rounds(len(trained)):] if r.get(key) is not None]
    if not tail:
        raise ValueError(f"no scored {key} in the tail's rounds")
    return statistics.fmean(tail)


def mean_sd(values: Sequence[float], pct: bool = True) -> str:
    """``mean ± sd`` (percent points with ``pct``); "—" for no values."""
    if not values:
        return "—"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3g}")
    sd = f" ± {f(statistics.stdev(values))}" if len(values) > 1 else ""
    return f"{f(statistics.fmean(values))}{sd}" + ("%" if pct else "")


def difference(ours: Sequence[float], theirs: Sequence[float]) -> str:
    """The paired per-seed difference ``ours − theirs`` in points, ± its sd, or "no difference"
    when it is not larger than its spread."""
    gaps = [a - b for a, b in zip(ours, theirs, strict=True)]
    if not gaps:
        return "—"
    mean = statistics.fmean(gaps)
    sd = statistics.stdev(gaps) if len(gaps) > 1 else math.inf
    text = f"{100 * mean:+.1f}" + (f" ± {100 * sd:.1f}" if len(gaps) > 1 else "") + " pts"
    return text if abs(mean) > sd else f"no difference ({text})"
