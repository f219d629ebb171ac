"""Dynamic padding: round time with every row padded to --max-length vs each pass to its longest row.

    python benchmarks/padding.py [--sst2 ../shared/data/sst2/train.tsv] [--max-length 64]

For SST-2 (short phrases; skipped when the file is absent) and BBC News (long articles, where
nearly every row reaches --max-length, so no change is expected) it runs the same simulator job
twice in this process, ``--padding max-length`` then ``--padding longest``, and prints the
training and evaluation seconds of each round and their ratios. The job: MiniLM, 10 IID clients,
``--rounds`` rounds of 10 local steps of 8 examples; a warm-up run comes first.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
from pathlib import Path

from fedlora.job.schema import JobConfig
from fedlora.simulations.engine import run

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def sst2_sample(src: Path, rows: int, out: Path) -> Path:
    """``rows`` phrases of SST-2 drawn with a fixed seed, as a TSV (label, sentence)."""
    with src.open(newline="") as fh:
        data = list(csv.DictReader(fh, delimiter="\t"))
    pick = random.Random(0).sample(data, min(rows, len(data)))
    path = out / "sst2.tsv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["label", "sentence"], delimiter="\t")
        writer.writeheader()
        writer.writerows({"label": r["label"], "sentence": r["sentence"]} for r in pick)
    return path


def timed(cfg: JobConfig, out: Path) -> tuple[float, float, float]:
    """``(train s per round, eval s per round, final accuracy)`` over rounds ≥ 1."""
    rows = run(cfg, out)[1:]
    return (sum(r["train_seconds"] for r in rows) / len(rows),
            sum(r["eval_seconds"] for r in rows) / len(rows), rows[-1]["accuracy"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sst2", type=Path, default=SST2, help="SST-2 train.tsv (skipped if absent)")
    p.add_argument("--rows", type=int, default=5000, help="SST-2 phrases sampled")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-padding-"))
    sets = [("BBC News", {"data": "bbcnews"})]
    if args.sst2.is_file():
        sample = sst2_sample(args.sst2, args.rows, tmp)
        sets.insert(0, ("SST-2", {"data": str(sample), "text_column": "sentence"}))
    else:
        print(f"SST-2 not found at {args.sst2}: BBC News only", file=sys.stderr)
    base = {"num_clients": 10, "rounds": args.rounds, "local_steps": 10, "batch_size": 8,
            "max_length": args.max_length, "seed": 0, "eval_batch_size": 64}
    run(JobConfig(**{**base, "rounds": 1, "local_steps": 2, "num_clients": 2}), tmp / "warm-up")
    print("| data | padding | train s / round | eval s / round | final acc |")
    print("|---|---|---:|---:|---:|")
    ratios = []
    for name, data in sets:
        got = {}
        for padding in ("max-length", "longest"):
            cfg = JobConfig(**{**base, **data, "padding": padding})
            got[padding] = timed(cfg, tmp / f"{name}-{padding}")
            train, ev, acc = got[padding]
            print(f"| {name} | {padding} | {train:.1f} | {ev:.1f} | {acc:.1%} |", flush=True)
        fixed, dynamic = got["max-length"], got["longest"]
        ratios.append((name, fixed[0] / dynamic[0], fixed[1] / dynamic[1]))
    print()
    for name, train, ev in ratios:
        print(f"{name}: fixed / dynamic padding = {train:.2f}x (training), {ev:.2f}x (evaluation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
