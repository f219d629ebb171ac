"""What ``--track`` adds to a round: the BBC News default job (``fedlora-sim``'s defaults) untracked, with
``--track tensorboard`` and with ``--track mlflow`` (when installed), one after the other in one process.

For each it prints the mean round time (rounds 1..R: wall time from one committed row to the next, so
training, evaluation, writing the row and logging it to the trackers) and its ratio to the untracked
run's, and the seconds spent inside the trackers per round
(:attr:`fedlora.rounds.tracking.Tracking.seconds`: opening the run, every row's log, the adapter as
an artifact and closing, all charged to the rounds) as a share of the tracked round. On a shared machine
the first ratio carries the other jobs' noise (a few percent between two untracked runs); the second is
the trackers' own cost.

Usage::

    nice -n 5 python benchmarks/tracking.py            # the defaults: 10 clients, 3 rounds
    python benchmarks/tracking.py --rounds 1 --trackers tensorboard
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fedlora.job.flags import to_config
from fedlora.rounds.tracking import TRACKERS, Tracking
from fedlora.simulations.cli import build_parser
from fedlora.simulations.engine import run


def measure(track: str | None, out: Path, rounds: int) -> tuple[float, float]:
    """One default job (with tracker ``track``): (mean round seconds, tracker seconds per round)."""
    flags = ["--out", str(out), "--rounds", str(rounds)] + (["--track", track] if track else [])
    cfg = to_config(build_parser().parse_args(flags))
    tracking = Tracking.open(cfg, out)
    committed: list[float] = []  # when each round's row was written and logged
    run(cfg, out, on_round=lambda row: committed.append(time.perf_counter()), tracking=tracking)
    spent = 0.0
    if tracking is not None:
        tracking.finish({})
        spent = tracking.seconds
    return statistics.mean(b - a for a, b in zip(committed, committed[1:], strict=False)), spent / rounds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trackers", default="tensorboard,mlflow",
                   help="comma-separated; those not installed are left out")
    args = p.parse_args()
    names = [n for n in args.trackers.split(",") if n and TRACKERS[n].missing() is None]
    skipped = sorted(set(args.trackers.split(",")) - set(names) - {""})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base, _ = measure(None, Path(tmp) / "none", args.rounds)
        print(f"untracked      round {base:7.2f} s")
        for name in names:
            mean, spent = measure(name, Path(tmp) / name, args.rounds)
            print(f"{name:<14} round {mean:7.2f} s  ratio {mean / base:.4f}  in the tracker"
                  f" {spent * 1e3:8.1f} ms per round ({100 * spent / mean:.3f}% of the round)")
        print(f"({len(names) + 1} default jobs of {args.rounds} rounds in {time.perf_counter() - t0:.0f} s"
              + (f"; not installed: {', '.join(skipped)}" if skipped else "") + ")")


if __name__ == "__main__":
    main()
