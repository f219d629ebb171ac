"""One dishonest client of ten, with and without the server's defences: accuracy after 3 rounds.

The job (every run, ``fedlora-sim``): MiniLM on BBC News, 10 IID clients, every client in every
round, ``--rounds`` rounds of 10 local steps of 8 examples, LoRA r = 8, the strategy's default
learning rate, seed 0. Client 0 attacks (``fedlora/rounds/attacks.py``):

* ``scale:100``: its update blown up 100 times; ``flip``: its update's sign flipped (the same
  size); ``claim:1e9``: its honest update with 10⁹ examples claimed.

Each attack runs undefended and with each defence (``strategies/robust.py``): ``--norm-bound 2``
(updates above twice the round's median norm are scaled down to it), ``--robust-mean trimmed``
(β = 0.1: one client dropped at each end of every coordinate), ``--robust-mean median``,
``--robust-mean krum`` (multi-Krum: the one client farthest from its neighbours left out), and for
the claim ``--max-examples 200`` (a client holds about 178). The table gives the final accuracy
and its difference from the clean run (the same job, no attacker); the clean job with each defence
shows what the defence itself costs. Finished runs are reused.

    python benchmarks/robust.py [--out runs/robust] [--strategies fedavg,ffa-lora] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stats import read_rows

ATTACKS = {"": ["norm-bound", "trimmed", "median", "krum"],  # what each defence costs a clean run
           "scale:100": ["none", "norm-bound", "trimmed", "median", "krum"],
           "flip": ["none", "norm-bound", "trimmed", "median", "krum"],
           "claim:1e9": ["none", "max-examples", "uniform"]}
DEFENCES = {"none": [], "norm-bound": ["--norm-bound", "2"], "trimmed": ["--robust-mean", "trimmed"],
            "median": ["--robust-mean", "median"], "krum": ["--robust-mean", "krum"],
            "max-examples": ["--max-examples", "200"], "uniform": ["--weighting", "uniform"]}


#: The row column naming the clients each defence dropped or moved.
CAUGHT = {"norm-bound": "norm_bounded_clients", "krum": "krum_dropped"}


def caught(rows: list[dict], defence: str, attacker: int = 0) -> str:
    """In how many rounds the defence dropped or moved the attacker, and whom else it hit."""
    if defence not in CAUGHT:
        return "—"
    hit = [r.get(CAUGHT[defence]) or [] for r in rows[1:]]
    others = sorted({c for h in hit for c in h if c != attacker})
    return f"{sum(attacker in h for h in hit)}/{len(hit)}" + (f" (also {others})" if others else "")


def run_rows(args: argparse.Namespace, name: str, flags: list[str]) -> list[dict]:
    """The rows of one run (run now unless it finished before)."""
    from fedlora.simulations.cli import main as sim

    out = Path(args.out) / name
    metrics = out / "metrics.jsonl"
    rows = read_rows(out) if metrics.is_file() else []
    if len(rows) != args.rounds + 1:
        base = ["--num-clients", "10", "--rounds", str(args.rounds), "--local-steps", "10", "--seed", "0",
                "--out", str(out), "--overwrite", "--quiet"]
        if sim([*base, *flags]) != 0:
            raise SystemExit(f"run {name} failed")
        rows = read_rows(out)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/robust")
    p.add_argument("--strategies", default="fedavg")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lines = ["| strategy | attack (client 0 of 10) | defence | final accuracy | vs clean |"
             " client 0 dropped/bounded (rounds) |", "|---|---|---|---|---|---|"]
    for strategy in args.strategies.split(","):
        clean = run_rows(args, f"{strategy}-clean", ["--strategy", strategy])[-1]["accuracy"]
        lines.append(f"| {strategy} | none | none | {clean:.1%} | — | — |")
        for attack, defences in ATTACKS.items():
            for defence in defences:
                flags = ["--strategy", strategy, *DEFENCES[defence]]
                if attack:
                    flags += ["--attack", attack, "--attackers", "1"]
                name = f"{strategy}-{attack.replace(':', '') or 'clean'}-{defence}"
                rows = run_rows(args, name, flags)
                acc, gap = rows[-1]["accuracy"], 100 * (rows[-1]["accuracy"] - clean)
                lines.append(f"| {strategy} | {attack or 'none'} | {defence} | {acc:.1%} | {gap:+.1f} |"
                             f" {caught(rows, defence) if attack else '—'} |")
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
