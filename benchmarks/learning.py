"""Learning quality: every strategy vs centralized LoRA, on BBC News (and SST-2 when present).

Settings (MiniLM, r = 8, the ``fedlora-sim`` defaults otherwise: 3 rounds of 10 local steps
of 8 × 64 tokens, seed 0):

* BBC News, 10 clients (all train every round), IID and Dirichlet α = 0.5;
* BBC News, 100 clients, 10 sampled per round, IID and Dirichlet α = 0.5;
* SST-2 (``../shared/data/sst2/train.tsv``, a seeded sample of ``--sst2-rows`` phrases),
  10 IID clients, when the folder is present.

Every federated setting runs ``fedlora-compare`` (all four strategies on the same partition).
The centralized baseline is LoRA on the union of the clients' data: one client holding the
whole training split, trained for as many examples as a federated round's clients see
together (``local_steps × clients_per_round`` steps per round, same rounds, batch and lr as
FedAvg). Each run lands in ``OUT/<setting>/``; the script prints one Markdown table.

Run: ``python benchmarks/learning.py --out runs/learning`` (about 20 runs; ~3 min each on
2 CPU cores). ``--quick`` runs a 1-round smoke version.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"


def sst2_sample(out: Path, rows: int, seed: int = 0) -> Path:
    """A seeded sample of SST-2's training phrases as a TSV (``label``, ``sentence``)."""
    lines = SST2.read_text().splitlines()
    header, body = lines[0], lines[1:]
    pick = random.Random(seed).sample(body, min(rows, len(body)))
    path = out / "sst2-sample.tsv"
    path.write_text("\n".join([header, *pick]) + "\n")
    return path


def settings(args: argparse.Namespace, sst2: Path | None) -> list[tuple[str, list[str], int]]:
    """``(name, job flags, clients per round)`` of each federated setting."""
    bbc = ["--data", "bbcnews"]
    out = []
    for n, k in ((10, 10), (100, 10)):
        for part in (["--partition", "iid"], ["--partition", "dirichlet", "--alpha", "0.5"]):
            name = f"bbc-{n}-clients-{part[1]}"
            out.append((name, [*bbc, "--num-clients", str(n), "--clients-per-round", str(k), *part], k))
    if sst2 is not None:
        out.append(("sst2-10-clients-iid", ["--data", str(sst2), "--text-column", "sentence",
                                            "--num-clients", "10", "--partition", "iid"], 10))
    return out


def common(args: argparse.Namespace) -> list[str]:
    return ["--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--seed", str(args.seed),
            "--quiet", "--overwrite"]


def centralized(data_flags: list[str], per_round: int, args: argparse.Namespace, out: Path) -> float:
    """Final accuracy of one client trained on the union (same examples per round as the round's clients)."""
    from fedlora.simulations.cli import main as sim

    flags = [f for f in data_flags]
    i = flags.index("--num-clients")
    flags[i + 1] = "1"
    if "--partition" in flags:
        j = flags.index("--partition")
        del flags[j:j + 2]
        if "--alpha" in flags:
            k = flags.index("--alpha")
            del flags[k:k + 2]
    if "--clients-per-round" in flags:
        k = flags.index("--clients-per-round")
        del flags[k:k + 2]
    steps = args.local_steps * per_round
    code = sim([*flags, "--rounds", str(args.rounds), "--local-steps", str(steps), "--seed", str(args.seed),
                "--strategy", "fedavg", "--quiet", "--overwrite", "--out", str(out)])
    if code != 0:
        raise SystemExit(f"centralized run failed ({out})")
    return final_accuracy(out)


def final_accuracy(folder: Path) -> float:
    import json

    rows = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return rows[-1]["accuracy"]


def read_table(folder: Path) -> list[dict]:
    with (folder / "comparison.csv").open() as fh:
        return list(csv.DictReader(fh))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/learning"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sst2-rows", type=int, default=5000)
    p.add_argument("--only", default=None, help="run only the settings whose name contains this")
    p.add_argument("--strategies", default=None, help="passed to fedlora-compare (default: all four)")
    p.add_argument("--report-only", action="store_true",
                   help="no runs: rebuild the table from the runs already in --out")
    p.add_argument("--quick", action="store_true", help="1 round of 2 steps (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.local_steps = 1, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    sst2 = sst2_sample(args.out, args.sst2_rows, args.seed) if SST2.is_file() else None
    if sst2 is None:
        print(f"SST-2 not found at {SST2}: its setting is skipped", file=sys.stderr)
    from fedlora.simulations.compare import main as compare

    lines = ["| setting | run | final acc | best acc | vs centralized | bytes up+down | wall s |",
             "|---|---|---|---|---|---|---|"]
    central: dict[str, float] = {}
    for name, flags, per_round in settings(args, sst2):
        if args.only and args.only not in name:
            continue
        t0 = time.perf_counter()
        folder = args.out / name
        key = name.split("-")[0]
        if args.report_only:
            if not (folder / "comparison.csv").is_file():
                continue
        elif compare([*flags, *common(args), "--out", str(folder),
                      *(["--strategies", args.strategies] if args.strategies else [])]) != 0:
            raise SystemExit(f"fedlora-compare failed for {name}")
        if key not in central:
            done = args.out / f"{key}-centralized"
            central[key] = final_accuracy(done) if (done / "metrics.jsonl").is_file() \
                else centralized(flags, per_round, args, done)  # shared by the settings: run once
            lines.append(f"| {key} | centralized LoRA (union, {per_round}× steps) | {central[key]:.1%} |"
                         " | | | |")
        for row in read_table(folder):
            acc = float(row["final_accuracy"])
            lines.append(f"| {name} | {row['run']} | {acc:.1%} | {float(row['best_accuracy']):.1%} |"
                         f" {acc - central[key]:+.1%} | {int(float(row['bytes_total'])):,} |"
                         f" {float(row['seconds']):.0f} |")
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"job: MiniLM, r = 8, {args.rounds} rounds × {args.local_steps} local steps of 8 × 64 tokens,"
          f" seed {args.seed}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
