"""Accuracy against ε with sample-level DP-SGD on SST-2, and the sweep behind the DP defaults.

Job (every run): MiniLM, SST-2's 67,349 training phrases (``../shared/data/sst2/train.tsv``)
split IID over ``--clients`` clients (13k+ each at 5), evaluated on the 872 dev sentences
(``dev.tsv``), ``--max-length 32`` with dynamic padding, batch ``--batch-size`` (≥ 256, Poisson
under DP: q_k = batch / n_k), ``--rounds`` × ``--local-steps`` steps per client, δ = 1e-5.

* ``table`` (default): for each strategy (fedavg, ffa-lora, fed-sb) and ε ∈ {1, 3, 8, ∞} (∞: the
  same job without DP), the final and best dev accuracy, σ, q, the steps each client took and
  the ε every client ended at. With ``--seeds 0,1,2`` every run is repeated per seed (the
  clients' draws, the adapters' start, the noise; the split stays ``--split-seed``'s) in
  ``OUT/<strategy>-eps<ε>/seed<k>/``, and a second table gives the final accuracy as mean ± sd
  and its paired difference from the same seeds' ε = ∞ runs (``stats.difference``).
* ``--sweep``: FFA-LoRA at ε = 8 over learning rates × clipping norms (and head options),
  fewer rounds: the source of the ``--dp sample`` defaults (``fedlora.job.defaults.DP_RECIPE``).
* ``--client-level``: ``--dp client`` (the server clips and noises each client's update) with
  ``--clients`` clients (e.g. 100) and ``--per-round`` of them per round, at ε = 8 and without DP.
* ``--snr``: each strategy's ε = 8 job at its start (after its initialisation): per-example
  gradient norms, the mean clipped gradient's norm and one step's noise ``σ C / B · √D``.
* ``--clip-study``: client 0 alone from that start, DP-SGD under several clips and noise levels
  (``--study-settings``, e.g. clipping without noise): loss and dev accuracy every 20 steps.
  The three studies are in ``dp_studies.py``; they start from this script's ε = 8 job.

Data (``benchmarks/splits.py``, by source sentence, so no part holds a piece of another's
sentence): ``--validation-fraction`` of SST-2's training sentences (default 0.1) are a validation
part, and with ``--public-fraction F`` (0.015: about 950 phrases) a public part that every run
uses for its head (``--head public``) and Fed-SB for its initialisation (``--init-data``), at no ε;
the clients split the rest. Runs are scored on ``--eval-on``: ``validation`` (the default of
``--sweep``, ``--clip-study``, ``--snr``: every choice is made there) or ``dev`` (the default of the
final table; read once). With ``--job-flags '--public-steps 40'`` the server also warm-starts
the adapters on it before round 1 (the runs' start; with ``--public-fraction 0.015 --rounds 3
--local-steps 20`` FedAvg at ε = 8 then ends 3.6 ± 0.5 points under its non-private job over 3
seeds, RESULTS.md).

Each run is one ``fedlora-sim`` job in ``OUT/<run>/``; finished runs are reused, so an
interrupted table resumes, and ``--report-only`` rebuilds the table. ``--quick`` is a smoke run
(1 round of 2 steps of 32 examples). Cost on a 2-core CPU: printed per run (``wall s``).

Usage::

    python benchmarks/dp_learning.py --out runs/dp_learning
    python benchmarks/dp_learning.py --out runs/dp_sweep --sweep
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dp_studies import Flags, clip_study, norms, snr
from splits import split_file
from stats import difference, mean_sd, read_rows

ROOT = Path(__file__).resolve().parents[1]
EPSILONS = ("1", "3", "8", "inf")


def job(args: argparse.Namespace, strategy: str, epsilon: str, out: Path, extra=()) -> list[str]:
    """The ``fedlora-sim`` flags of one run."""
    test, column = ((args.validation_file, "sentence") if args.eval_on == "validation"
                    else (Path(args.data_dir) / "dev.tsv", "content"))
    flags = ["--data", str(args.train_file), "--text-column", "sentence", "--test-data",
             str(test), "--test-text-column", column, "--num-clients", str(args.clients),
             "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--batch-size",
             str(args.batch_size), "--max-length", str(args.max_length), "--strategy", strategy,
             "--seed", str(args.seed), "--out", str(out), "--quiet", "--overwrite",
             "--eval-batch-size", "256"]
    if epsilon != "inf":
        flags += ["--dp", "sample", "--epsilon", epsilon, "--delta", "1e-5", "--dp-backend", "fedlora"]
    if args.public_file:  # the same in every run, private or not
        flags += ["--init-data", str(args.public_file), "--head", "public"]
    return [*flags, *extra]


def data_split(args: argparse.Namespace) -> tuple[Path, Path | None, Path]:
    """``(private file, public file or None, validation file)``: SST-2's training phrases split by
    source sentence (:func:`splits.split_file`, seeded by ``--split-seed``)."""
    fractions = {"public": args.public_fraction, "validation": args.validation_fraction}
    paths = split_file(Path(args.data_dir) / "train.tsv", Path(args.out) / "data", fractions, args.split_seed)
    return paths["private"], paths["public"] if args.public_fraction else None, paths["validation"]


def run(args: argparse.Namespace, name: str, flags: list[str]) -> dict | None:
    """Run one job unless its metrics exist; the summary of its rows (None if it did not run)."""
    from fedlora.simulations.cli import main as sim

    out = Path(args.out) / name
    metrics = out / "metrics.jsonl"
    if not (metrics.is_file() and (out / "adapter").is_dir()) and not args.report_only:
        t0 = time.perf_counter()
        if sim(flags) != 0:
            raise SystemExit(f"run {name} failed")
        (out / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    if not metrics.is_file():
        return None
    rows = read_rows(out)
    cfg = json.loads((out / "config.json").read_text())
    last = rows[-1]
    wall = json.loads((out / "wall.json").read_text())["seconds"] if (out / "wall.json").is_file() else None
    return {"final": last["accuracy"], "best": max(r["accuracy"] for r in rows[1:]),
            "sigma": last.get("noise_multiplier"), "eps": last.get("epsilon_per_client"),
            "steps": cfg["rounds"] * cfg["local_steps"], "wall": wall, "lr": cfg["lr"],
            "clip": cfg["max_grad_norm"] or last.get("max_grad_norm"),  # given, or measured (public file)
            "rounds": len(rows) - 1}


def fmt(s: dict | None, eps: str, q: float) -> str:
    if s is None:
        return "| (not run) |"
    spent = "—" if not s["eps"] else f"{min(s['eps']):.2f}–{max(s['eps']):.2f}"
    sigma = "—" if s["sigma"] is None else f"{s['sigma']:.3f}"
    wall = "—" if s["wall"] is None else f"{s['wall']:.0f}"
    clip = "—" if s["clip"] is None else f"{s['clip']:.3g}"
    return (f"{s['final']:.1%} | {s['best']:.1%} | {sigma} | {q if eps != 'inf' else 1:.4f} | {s['steps']} |"
            f" {spent} | {s['lr']:g} | {clip} | {wall} |")


def sizes(args: argparse.Namespace) -> float:
    """q of a client of the IID split (all clients within one example of each other)."""
    n = sum(1 for _ in open(args.train_file)) - 1
    return min(1.0, args.batch_size / (n // args.clients))


def table(args: argparse.Namespace) -> int:
    q = sizes(args)
    seeds = [int(k) for k in args.seeds.split(",")] if args.seeds else [args.seed]
    lines = ["| strategy | ε | seed | final acc | best acc | σ | q | steps / client | ε spent (clients) |"
             " lr | clip | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    finals: dict[tuple[str, str], list[float]] = {}
    for strategy in args.strategies.split(","):
        for eps in args.epsilons.split(","):
            extra = [*args.job_flags, *([] if eps == "inf" else args.dp_flags)]
            for seed in seeds:
                local = argparse.Namespace(**{**vars(args), "seed": seed})
                name = f"{strategy}-eps{eps}" + (f"/seed{seed}" if args.seeds else "")
                s = run(local, name, job(local, strategy, eps, Path(args.out) / name, extra))
                if s is not None:
                    finals.setdefault((strategy, eps), []).append(s["final"])
                lines.append(f"| {strategy} | {eps} | {seed} | {fmt(s, eps, q)}")
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    if len(seeds) > 1:
        print("\n" + "\n".join(seed_summary(finals, len(seeds))))
    return 0


def seed_summary(finals: dict[tuple[str, str], list[float]], seeds: int) -> list[str]:
    """Per strategy and ε: the final accuracy over seeds (mean ± sd) and its paired difference
    from ε = ∞ ("—" unless both have every seed)."""
    lines = ["| strategy | ε | seeds run | final acc | vs no DP (paired) |", "|---|---|---|---|---|"]
    for (strategy, eps), values in finals.items():
        base = finals.get((strategy, "inf"), [])
        vs = difference(values, base) if eps != "inf" and len(values) == len(base) == seeds else "—"
        lines.append(f"| {strategy} | {eps} | {len(values)} | {mean_sd(values)} | {vs} |")
    return lines


def sweep(args: argparse.Namespace) -> int:
    q = sizes(args)
    lines = ["| strategy | ε | settings | final acc | best acc | σ | q | steps / client | ε spent | lr |"
             " clip | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fixed = " ".join(args.dp_flags)
    grid = [([*args.dp_flags, "--lr", lr, "--max-grad-norm", clip], f"lr {lr}, clip {clip}")
            for lr in args.sweep_lrs.split(",") for clip in args.sweep_clips.split(",")]
    grid += [([*args.dp_flags, "--head", head], f"head {head}")
             for head in args.sweep_heads.split(",") if head]
    for flags, label in grid:
        label = f"{label}, {fixed}" if fixed else label
        name = "sweep-" + label.replace(", ", "-").replace(" ", "")
        s = run(args, name, job(args, "ffa-lora", "8", Path(args.out) / name, flags))
        lines.append(f"| ffa-lora | 8 | {label} | {fmt(s, '8', q)}")
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


def client_level(args: argparse.Namespace) -> int:
    """``--dp client`` at 100 clients, ``--per-round`` sampled each round: the sum-only strategies
    at ε = 8 (and ∞) on the same SST-2 split (673 phrases a client), ordinary local training."""
    lines = ["| strategy | ε | clients / round | rounds | final acc | best acc | σ | clipped (last round) |"
             " wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for strategy in args.strategies.split(","):
        for eps in ("8", "inf"):
            name = f"client-{strategy}-eps{eps}"
            flags = job(args, strategy, "inf", Path(args.out) / name)
            flags += ["--clients-per-round", str(args.per_round)]
            if eps != "inf":
                flags += ["--dp", "client", "--epsilon", eps, "--delta", "1e-3", "--update-clip",
                          str(args.update_clip)]
            s = run(args, name, flags)
            if s is None:
                lines.append(f"| {strategy} | {eps} | (not run) |")
                continue
            rows = read_rows(Path(args.out) / name)
            clipped = rows[-1].get("clipped_fraction")
            lines.append(f"| {strategy} | {eps} | {args.per_round} | {s['rounds']} | {s['final']:.1%} |"
                         f" {s['best']:.1%} | {rows[-1].get('noise_multiplier') or '—'} |"
                         f" {'—' if clipped is None else f'{clipped:.0%}'} | {s['wall'] or 0:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


def start_flags(args: argparse.Namespace) -> Flags:
    """The flags of a strategy's ε = 8 job (the table's), where the studies start."""
    return lambda strategy: job(args, strategy, "8", Path(args.out) / f"start-{strategy}",
                                [*args.job_flags, *args.dp_flags])


def build_parser() -> argparse.ArgumentParser:
    """The script's flags (the table's by default; ``--sweep`` and the studies choose others)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/dp_learning")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="", help="the table over these seeds (e.g. 0,1,2), mean ± sd")
    p.add_argument("--strategies", default="fedavg,ffa-lora,fed-sb")
    p.add_argument("--epsilons", default=",".join(EPSILONS))
    p.add_argument("--dp-flags", default="", help="extra flags for the DP runs (e.g. '--lr 5e-3')")
    p.add_argument("--job-flags", default="", help="extra flags for every run (e.g. '--head frozen')")
    p.add_argument("--sweep", action="store_true", help="the DP-defaults sweep instead of the table")
    p.add_argument("--sweep-lrs", default="1e-3,5e-3,2e-2")
    p.add_argument("--sweep-clips", default="0.1,1.0")
    p.add_argument("--sweep-heads", default="", help="e.g. zero,frozen (with --dp-flags of the best)")
    p.add_argument("--client-level", action="store_true",
                   help="--dp client at --clients clients (use 100), --per-round per round, batch 8")
    p.add_argument("--per-round", type=int, default=20)
    p.add_argument("--update-clip", type=float, default=0.5)
    p.add_argument("--norms", action="store_true", help="per-example gradient norms at the start")
    p.add_argument("--snr", action="store_true",
                   help="each strategy's ε = 8 job at its start: per-example norms, the mean clipped"
                        " gradient against one step's noise")
    p.add_argument("--clip-study", action="store_true",
                   help="client 0 alone from each strategy's ε = 8 start, under --study-settings")
    p.add_argument("--study-settings", default="inf:0,0.1:0,0.1:job,job:0,job:job")
    p.add_argument("--study-steps", type=int, default=60)
    p.add_argument("--study-schedule", choices=("constant", "linear"), default="constant",
                   help="the study's lr over its steps: constant, or linear decay to 0")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 round of 2 steps of 32 examples (smoke)")
    p.add_argument("--public-fraction", type=float, default=0.0,
                   help="this fraction of the training sentences (with their phrases) is public: every"
                        " run trains its head on it (--head public), Fed-SB initialises from it, no ε")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--eval-on", choices=("validation", "dev"), default=None,
                   help="score on the validation part (default for --sweep and the studies) or dev")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.dp_flags, args.job_flags = args.dp_flags.split(), args.job_flags.split()
    if args.quick:
        args.rounds, args.local_steps, args.batch_size = 1, 2, 32
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (Path(args.data_dir) / "train.tsv").is_file():
        print(f"dp_learning: no SST-2 at {args.data_dir} (pass --data-dir)", file=sys.stderr)
        return 2
    args.train_file, args.public_file, args.validation_file = data_split(args)
    choosing = args.sweep or args.clip_study or args.snr or args.norms
    args.eval_on = args.eval_on or ("validation" if choosing else "dev")
    if args.norms:
        return norms(args)
    if args.snr:
        return snr(args, start_flags(args))
    if args.clip_study:
        return clip_study(args, start_flags(args))
    if args.client_level:
        return client_level(args)
    return sweep(args) if args.sweep else table(args)


if __name__ == "__main__":
    sys.exit(main())
