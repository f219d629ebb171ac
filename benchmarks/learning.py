"""Learning study: every registered strategy vs centralized LoRA on BBC News, over seeds.

Settings (MiniLM, r = 8, 10 local steps of 8 × 64 tokens per round, each strategy's default lr;
every client holds out 20% of its examples, so rows also report ``personal_accuracy``):

* ``bbc-10-iid`` / ``bbc-10-dirichlet``: 10 clients, all train every round, IID or Dirichlet 0.5;
* ``bbc-10-dirichlet-hetero``: the same clients with ranks 2/4/8 (cycled), for the strategies
  that take heterogeneous ranks (flora, flexlora);
* ``bbc-100-dirichlet0.1``: 100 clients, 10 sampled per round, each client's label mix from
  Dirichlet 0.1 (``--partition dirichlet-clients``: the class-wise partitioner cannot give 100
  clients of 1,780 articles one example each at α = 0.1), 20 rounds (``--only bbc-100``).

Each (setting, seed) is one ``fedlora-compare`` run (same partition, seed and sampled clients
for every strategy) in ``OUT/<setting>/seed<k>/``, plus its centralized baseline: LoRA on the
union of the clients' training examples (one client, ``local_steps × clients per round`` steps
per round, same rounds, batch and lr as FedAvg) in ``OUT/<data>-centralized/seed<k>/``.

The table reports, per setting and strategy (``benchmarks/stats.py``): the final accuracy and the
tail mean (the last quarter of the rounds, at most 5) as mean ± sd over seeds, the difference of
the tail from the centralized baseline of the same seed ("no difference" when it is within its
spread), the final personal accuracy, and the rounds and bytes (up + down, cumulative) until the
global accuracy first reaches centralized − 2 points (mean over the seeds that reach it; "—"
when none does). RESULTS.md quotes the printed table as it is. The accuracy-vs-bytes plots are
the compare runs' ``accuracy_vs_bytes.png``.

Run: ``python benchmarks/learning.py --out runs/learning --only bbc-10-dirichlet --seeds 0``
(~10 min per strategy and seed on 2 CPU cores). ``--report-only`` rebuilds the table from the
runs in ``--out``; ``--quick`` is a 1-round smoke run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from stats import difference, mean_sd, read_rows, tail_mean

SETTINGS = {
    "bbc-10-iid": (["--num-clients", "10", "--partition", "iid"], 10, None),
    "bbc-10-dirichlet": (["--num-clients", "10", "--partition", "dirichlet", "--alpha", "0.5"], 10, None),
    "bbc-10-dirichlet-hetero": (["--num-clients", "10", "--partition", "dirichlet", "--alpha", "0.5",
                                 "--ranks", "2,4,8"], 10, "flora,flexlora"),
    "bbc-100-dirichlet0.1": (["--num-clients", "100", "--clients-per-round", "10", "--partition",
                              "dirichlet-clients", "--alpha", "0.1"], 10, None),
}
"""name -> (job flags, clients per round, strategies (None: all))."""


def job_flags(args: argparse.Namespace, seed: int) -> list[str]:
    return ["--data", "bbcnews", "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
            "--seed", str(seed), "--personal-test-fraction", "0.2", "--quiet", "--overwrite"]


def centralized(args: argparse.Namespace, per_round: int, seed: int, out: Path) -> Path:
    """One client holding the union of the clients' training examples (the same examples a
    round's clients see together per round)."""
    from fedlora.simulations.cli import main as sim

    if not (out / "metrics.jsonl").is_file() and not args.report_only:
        flags = [*job_flags(args, seed), "--num-clients", "1", "--strategy", "fedavg",
                 "--local-steps", str(args.local_steps * per_round), "--out", str(out)]
        if sim(flags) != 0:
            raise SystemExit(f"centralized run failed ({out})")
    return out


def finished(run: Path) -> bool:
    """A run that completed: its metrics and its exported adapter (written last)."""
    return (run / "metrics.jsonl").is_file() and (run / "adapter").is_dir()


def to_target(rows: list[dict], target: float) -> tuple[int | None, int | None]:
    """The first round whose accuracy is ≥ ``target`` and the bytes sent until then."""
    total = 0
    for r in rows:
        total += int(r["bytes_up"]) + int(r["bytes_down"])
        if r["round"] >= 1 and r["accuracy"] >= target:
            return r["round"], total
    return None, None


def table(args: argparse.Namespace, results: dict) -> list[str]:
    lines = ["| setting | run | final acc | tail acc | tail vs centralized | personal acc | rounds to C−2 |"
             " bytes to C−2 | total bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for setting, (central, runs) in results.items():
        finals = [rows[-1]["accuracy"] for rows in central]
        tails = [tail_mean(rows) for rows in central]
        lines.append(f"| {setting} | centralized LoRA | {mean_sd(finals)} | {mean_sd(tails)} | | | | | |")
        for run, per_seed in runs.items():
            final = [rows[-1]["accuracy"] for rows, _ in per_seed]
            tail = [tail_mean(rows) for rows, _ in per_seed]
            personal = [rows[-1]["personal_accuracy"] for rows, _ in per_seed
                        if rows[-1].get("personal_accuracy") is not None]
            hits = [to_target(rows, tail_mean(c) - 0.02) for rows, c in per_seed]
            reached = [h for h in hits if h[0] is not None]
            rounds = (f"{statistics.fmean(h[0] for h in reached):.1f} ({len(reached)}/{len(hits)})"
                      if reached else "—")
            sent = f"{statistics.fmean(h[1] for h in reached) / 1e6:.1f} MB" if reached else "—"
            total = statistics.fmean(sum(int(r["bytes_up"]) + int(r["bytes_down"]) for r in rows)
                                     for rows, _ in per_seed)
            gap = difference(tail, [tail_mean(c) for _, c in per_seed])
            lines.append(f"| {setting} | {run} | {mean_sd(final)} | {mean_sd(tail)} | {gap} |"
                         f" {mean_sd(personal)} | {rounds} | {sent} | {total / 1e6:.1f} MB |")
    return lines


def rounds_of(name: str, args: argparse.Namespace) -> int:
    """The rounds setting ``name`` runs: ``--rounds``, at least 20 for the 100-client settings."""
    return max(args.rounds, 20) if name.startswith("bbc-100") and not args.quick else args.rounds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/learning"))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--only", default=None, help="run only the settings whose name contains this (or is this)")
    p.add_argument("--strategies", default=None, help="passed to fedlora-compare (default: all)")
    p.add_argument("--report-only", action="store_true", help="no runs: the table from --out")
    p.add_argument("--quick", action="store_true", help="1 round of 2 steps (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.local_steps = 1, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedlora.simulations.compare import main as compare
    from fedlora.strategies.registry import STRATEGIES

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results: dict = {}
    for name, (flags, per_round, strategies) in SETTINGS.items():
        if args.only and (args.only not in name or (args.only in SETTINGS and args.only != name)):
            continue
        rounds = rounds_of(name, args)
        local = argparse.Namespace(**{**vars(args), "rounds": rounds})
        central, runs = [], {}
        for seed in seeds:
            t0 = time.perf_counter()
            folder = args.out / name / f"seed{seed}"
            chosen = (args.strategies or strategies or ",".join(sorted(STRATEGIES))).split(",")
            missing = [s for s in chosen if not finished(folder / s)]  # an interrupted study resumes
            if not args.report_only and missing:
                argv = [*flags, *job_flags(local, seed), "--strategies", ",".join(missing),
                        "--out", str(folder)]
                if compare(argv) != 0:
                    raise SystemExit(f"fedlora-compare failed for {name} seed {seed}")
            if not any(finished(d) for d in folder.glob("*")):
                continue
            home = args.out / f"{name.split('-')[0]}-{rounds}r-centralized"
            base = centralized(local, per_round, seed, home / f"seed{seed}")
            if not (base / "metrics.jsonl").is_file():
                continue
            c = read_rows(base)
            central.append(c)
            for run in sorted(d for d in folder.iterdir() if finished(d)):
                runs.setdefault(run.name, []).append((read_rows(run), c))
            print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if central:
            results[name] = (central, runs)
    per_setting = ", ".join(f"{name}: {rounds_of(name, args)}" for name in results)
    print(f"job: MiniLM, r = 8, rounds ({per_setting}) × {args.local_steps} local steps of 8 × 64 tokens,"
          f" seeds {args.seeds}")
    print("\n".join(table(args, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
