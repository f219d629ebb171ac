"""Federated instruction tuning of SmolLM2 on SST-2, every strategy against centralized LoRA.

    python benchmarks/llm_sft.py [--rounds 2] [--partitions iid,dirichlet] [--out runs/llm-sft]
                                 [--bases fp32,bf16,nf4] [--no-centralized] [--max-clients-per-pass K]
                                 [--seeds 0,1,2] [--device cuda] [--job-flags '--dp sample ...']

The job (``fedlora-sim --task sft``): SmolLM2-135M-Instruct, SST-2's 67,349 training phrases
over 10 clients (IID, or Dirichlet α=0.5 over the two labels), every client in every round,
10 local steps of 8 examples, LoRA r=8 on q_proj/v_proj, each strategy's default learning
rate; every registered strategy by default (``--strategies``), a personal one (FedSA-LoRA) also
scored by its clients' own models (:data:`PERSONAL_FRACTION`). Each phrase becomes a chat
prompt (the model's own template and system prompt) asking for the sentiment in one word; the
answer is ``positive`` or ``negative``. After every round the global model answers all 872
SST-2 dev sentences by greedy decoding (``answer_accuracy``) and scores the reference answers'
perplexity; round 0 is the model before training. ``--eval-every 0`` scores only the last round
(the final and tail columns; "—" for the others).

The centralized baseline is one client holding every phrase and taking 10 × 10 steps per
round, so it sees as many examples per round as the ten clients together; it runs on each of
``--bases``, and every federated row is compared with the one on its own base. Each run is its own
process (``fedlora-sim``); its peak resident memory is read from the kernel. Finished runs
(a complete ``metrics.jsonl``) are reused, so the script can be stopped and started again;
``--finished-only`` runs nothing and prints what is finished (its summary pairs each run with the
same seed's centralized run, so a seed still missing leaves a hole, not a misaligned pair).
``--against BASE`` adds a column to the summary: each run's tail against its plain twin on ``BASE``
(the same setting, strategy and seed, no ``--tag``), e.g. a corrected nf4 base against bf16. Runs of
another schedule (``--rounds``, ``--local-steps``, ``--clients``) go under
``rounds{R}-steps{S}-clients{K}``, and a folder that holds a finished run of more rounds is refused,
never overwritten.
Prints a Markdown table for ``benchmarks/RESULTS.md``.

``--bases`` runs each federated job on each frozen base (:data:`BASES`): ``fp32``, ``bf16``
(``--precision bf16``), or a bitsandbytes base that computes in bf16 (``nf4``, ``int8``:
``--quantize`` with ``--precision bf16``, as QLoRA does). ``--max-clients-per-pass`` bounds the
memory of a round's pass without changing its result (batched = one client at a time).

``--seeds`` runs every job (the centralized baseline too) once per seed (the split, the
partition, the adapters' initialisation and the batches). Each run prints its own row; with
more than one seed, a summary per setting follows (``benchmarks/stats.py``): the final and the
tail answer accuracy as mean ± sd over the seeds, and the tail's paired difference from the
same seed's centralized run ("no difference" within its spread). ``--job-flags`` passes more
``fedlora-sim`` flags to every federated job (e.g. ``--dp sample --epsilon 8``); its runs get
their own folders (``--tag``). ``--centralized-flags`` does the same for the centralized baseline
(``--centralized-tag``): a setting chosen for the federated runs (a larger ``--lr``) is tried on
the baseline too, so the comparison stays between two tuned runs.

``--public-fraction F`` splits SST-2's training file by source sentence (``benchmarks/splits.py``):
the clients hold the private part and ``--init-data`` is the public part (for ``--public-steps``,
the measured DP clip, Fed-SB's initialisation), or with ``--public-as calibration`` the
``--quant-calibration`` file of a ``--quant-correction`` job. ``--eval-on validation`` scores the rows on the
validation part instead of dev, for choosing settings; dev is for the final table. Either puts
the runs under ``OUT/public{F}-{dev|validation}``.

A table that takes longer than one sitting (the dev table: 19 runs a seed, about 7 min each on a
2-core CPU) keeps its runs in the repository: ``--out benchmarks/records/llm-sft-table``. Each run's
``metrics.jsonl``, ``config.json`` and ``peak_rss.json`` are committed (its adapter is ignored by
git), so a later sitting reuses them and the script prints the whole table from them. Since
2026-12-04 that table runs at ``--rounds 4 --local-steps 5`` (the same examples as the default 2 × 10,
averaged twice as often: chosen on validation, where it removed Dirichlet skew's loss); the default
schedule stays 2 × 10, so the earlier runs and their folders keep their meaning.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
from pathlib import Path

from splits import split_file
from stats import difference, mean_sd, read_rows, tail_mean

from fedlora.strategies import STRATEGIES as REGISTERED

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
PROMPT = ("Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
          "Review: {text}")
#: Every registered strategy, FedAvg first.
STRATEGIES = sorted(REGISTERED, key=lambda name: (name != "fedavg", name))
#: A strategy that keeps personal factors (FedSA-LoRA's B) has no one global model: its clients'
#: own models answer this share of each client's phrases, held out from its training (about 67
#: phrases a client at 10 clients), beside the global model's dev rows.
PERSONAL_FRACTION = 0.01
#: The default schedule (rounds, local steps, clients); runs of another one get their own folders.
SCHEDULE = (2, 10, 10)
#: The frozen base of a run: its extra fedlora-sim flags.
BASES = {"fp32": [], "bf16": ["--precision", "bf16"],
         "nf4": ["--quantize", "nf4", "--precision", "bf16"],
         "int8": ["--quantize", "int8", "--precision", "bf16"]}


def base_suffix(base: str) -> str:
    """What a run's folder name adds for its base: nothing for fp32 (the folders of earlier runs)."""
    return "" if base == "fp32" else f"-{base}"


def data_flags(args: argparse.Namespace) -> list[str]:
    """The data of every job: SST-2's whole training file scored on dev, or with
    ``--public-fraction`` / ``--eval-on validation`` its parts split by source sentence
    (:func:`splits.split_file`): the clients hold the private part, ``--init-data`` is the public
    part, and the rows are scored on the validation part or on dev."""
    if not args.public_fraction and args.eval_on == "dev":
        return ["--data", str(args.sst2 / "train.tsv"), *held_out_flags(args.sst2)]
    fractions = {"public": args.public_fraction, "validation": args.validation_fraction}
    folder = args.out / ("data" if not args.public_fraction else f"data-public{args.public_fraction:g}")
    parts = split_file(args.sst2 / "train.tsv", folder, fractions, seed=0)  # one folder a split
    public = ["--init-data", str(parts["public"])] if args.public_fraction else []
    if args.public_as == "calibration":  # only a corrected base reads it; the controls get no public file
        corrected = "--quant-correction" in args.job_flags
        public = ["--quant-calibration", str(parts["public"])] if corrected else []
    return ["--data", str(parts["private"]), *public, *held_out_flags(args.sst2, parts, args.eval_on)]


def held_out_flags(sst2: Path, parts: dict[str, Path] | None = None, eval_on: str = "dev") -> list[str]:
    """The held-out rows' flags: SST-2's dev sentences, or the split ``parts``' validation phrases."""
    if eval_on == "validation":
        return ["--test-data", str(parts["validation"]), "--test-text-column", "sentence"]
    return ["--test-data", str(sst2 / "dev.tsv"), "--test-text-column", "content"]


def job_flags(args: argparse.Namespace, seed: int) -> list[str]:
    return ["--task", "sft", "--model", "smollm2", *data_flags(args),
            "--text-column", "sentence", "--label-words", "0=negative,1=positive",
            "--prompt-template", PROMPT,
            "--eval-max", str(args.eval_max), "--eval-every", str(args.eval_every),
            "--rounds", str(args.rounds), "--batch-size", "8",
            "--max-length", "96", "--eval-batch-size", "16", "--seed", str(seed), "--device", args.device,
            "--quiet"]


def child(argv: list[str]) -> int:
    """Run fedlora-sim in this process, then print its peak resident memory (bytes)."""
    from fedlora.simulations.cli import main

    code = main(argv)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return code


def finished(out: Path, rounds: int) -> list[dict] | None:
    """The rows of a finished run of ``rounds`` rounds in ``out``, or None (absent or unfinished)."""
    rows = read_rows(out) if (out / "metrics.jsonl").is_file() else []
    if rows and rows[-1]["round"] > rounds:
        raise SystemExit(f"{out} holds a run of {rows[-1]['round']} rounds, not {rounds}:"
                         " pass its --rounds, or another --out")
    return rows if rows and rows[-1]["round"] == rounds else None


def run(out: Path, flags: list[str], rounds: int, finished_only: bool = False
        ) -> tuple[list[dict] | None, int | None]:
    """``(metric rows, peak RSS)`` of one run, reusing a finished one; ``(None, None)`` for an
    unfinished one with ``finished_only`` (nothing runs)."""
    peak = out / "peak_rss.json"
    rows = finished(out, rounds)
    if rows is not None:
        return rows, json.loads(peak.read_text())["peak_rss"] if peak.is_file() else None
    if finished_only:
        print("not finished, left out:", out, file=sys.stderr, flush=True)
        return None, None
    cmd = [sys.executable, __file__, "--child", *flags, "--out", str(out), "--overwrite"]
    print("running:", out.name, file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{out.name} failed:\n{proc.stderr[-3000:]}")
    peak_rss = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss"]
    peak.write_text(json.dumps({"peak_rss": peak_rss}) + "\n")
    return read_rows(out), peak_rss


def row_line(setting: str, name: str, rows: list[dict], peak: int | None, central: float | None) -> str:
    accs = " / ".join("—" if r.get("answer_accuracy") is None else f"{r['answer_accuracy']:.1%}"
                      for r in rows)
    trained = rows[1:]
    train = sum(r["train_seconds"] for r in trained) / len(trained)
    scored = [r["eval_seconds"] for r in trained if r.get("answer_accuracy") is not None]
    ev = sum(scored) / len(scored)  # the last round is always scored
    gap = "" if central is None else f"{rows[-1]['answer_accuracy'] - central:+.1%}"
    if "personal_accuracy" in rows[-1]:
        name += (f" (global = base; clients' own models: {rows[-1]['personal_accuracy']:.1%} of"
                 f" {rows[-1]['personal_examples']} own phrases)")
    mem = "-" if peak is None else f"{peak / 2**30:.1f} GiB"
    return (f"| {setting} | {name} | {accs} | **{rows[-1]['answer_accuracy']:.1%}** |"
            f" {tail_mean(rows, 'answer_accuracy'):.1%} | {gap} | {rows[-1]['perplexity']:.3f} |"
            f" {train:.0f} + {ev:.0f} | {mem} |")


Runs = dict[tuple[str, str, str], dict[int, list[dict]]]
"""Rows by (setting, run name, base), then by seed."""


def summary(runs: Runs, central: dict[str, dict[int, list[dict]]], versus: Runs | None = None,
            against: str = "") -> list[str]:
    """One line per (setting, run) over its seeds: final and tail mean ± sd, tail vs the centralized
    runs on the same base (paired by seed; "—" unless every seed has one); a personal strategy's
    clients' own models beside it. With ``against`` (``--against``), the tail vs each run's plain
    twin on that base too (``versus``: its rows by seed, paired the same way)."""
    lines = ["| setting | run | seeds | final | tail | tail vs centralized |"
             + (f" tail vs {against} |" if against else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if against else "")]
    for key, by_seed in runs.items():
        setting, name, base = key
        seeds = [by_seed[s] for s in sorted(by_seed)]
        tails = [tail_mean(rows, "answer_accuracy") for rows in seeds]
        vs = _paired(tails, [central.get(base, {}).get(s) for s in sorted(by_seed)])
        finals = [rows[-1]["answer_accuracy"] for rows in seeds]
        if all("personal_accuracy" in rows[-1] for rows in seeds):
            name += f" (clients' own models: {mean_sd([rows[-1]['personal_accuracy'] for rows in seeds])})"
        twin = f" {_paired(tails, [(versus or {}).get(key, {}).get(s) for s in sorted(by_seed)])} |"
        lines.append(f"| {setting} | {name} | {len(seeds)} | {mean_sd(finals)} | {mean_sd(tails)} | {vs} |"
                     + (twin if against else ""))
    return lines


def _paired(tails: list[float], others: list[list[dict] | None]) -> str:
    """:func:`stats.difference` of ``tails`` and the other runs' tails, seed by seed ("—" unless every
    seed has one)."""
    if None in others:
        return "—"
    return difference(tails, [tail_mean(rows, "answer_accuracy") for rows in others])


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sst2", type=Path, default=SST2, help="folder with SST-2's train.tsv and dev.tsv")
    p.add_argument("--rounds", type=int, default=SCHEDULE[0])
    p.add_argument("--local-steps", type=int, default=SCHEDULE[1])
    p.add_argument("--clients", type=int, default=SCHEDULE[2])
    p.add_argument("--eval-max", type=int, default=0, help="dev sentences scored per round (0: all 872)")
    p.add_argument("--eval-every", type=int, default=1,
                   help="score round 0 and every N-th round, and the last (0: only the last: the final"
                        " and tail columns need no more, and scoring 872 answers takes 1.5 min)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--partitions", default="iid,dirichlet")
    p.add_argument("--bases", default="fp32", help=f"comma list of {', '.join(BASES)}")
    p.add_argument("--no-centralized", action="store_true", help="skip the centralized baseline")
    p.add_argument("--max-clients-per-pass", type=int, default=0)
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--job-flags", default="", help="more fedlora-sim flags for the federated jobs")
    p.add_argument("--tag", default="", help="suffix of the federated runs' folders (with --job-flags)")
    p.add_argument("--centralized-flags", default="",
                   help="more fedlora-sim flags for the centralized baseline (e.g. its own --lr)")
    p.add_argument("--centralized-tag", default="", help="suffix of its folder (with --centralized-flags)")
    p.add_argument("--out", type=Path, default=Path("runs/llm-sft"))
    p.add_argument("--public-fraction", type=float, default=0.0,
                   help="share of SST-2's training sentences held out as the public --init-data file"
                        " (split by source sentence; 0: no public file, the clients hold every phrase)")
    p.add_argument("--public-as", choices=("init-data", "calibration"), default="init-data",
                   help="what the public part is: --init-data, or the --quant-calibration file of the jobs"
                        " whose --job-flags hold --quant-correction (the others then get none)")
    p.add_argument("--validation-fraction", type=float, default=0.1,
                   help="share of the training sentences held out for --eval-on validation")
    p.add_argument("--finished-only", action="store_true",
                   help="run nothing: print the finished runs and their summary, leave out the rest")
    p.add_argument("--against", default="", choices=("", *BASES),
                   help="the summary also sets each run against its plain run on this base (no --tag,"
                        " same setting and seed): e.g. --bases nf4 --tag qc8 --against bf16")
    p.add_argument("--eval-on", choices=("dev", "validation"), default="dev",
                   help="score on dev (the final table) or on the validation part (choosing settings)")
    args = p.parse_args(argv)
    if unknown := set(args.bases.split(",")) - set(BASES):
        raise SystemExit(f"unknown base {sorted(unknown)}; use {', '.join(BASES)}")
    if args.job_flags and not args.tag:
        raise SystemExit("--job-flags needs --tag: its runs must not reuse the plain runs' folders")
    if args.centralized_flags and not args.centralized_tag:
        raise SystemExit("--centralized-flags needs --centralized-tag: its run must not reuse the plain"
                         " centralized run's folder")
    if not (args.sst2 / "train.tsv").is_file():
        raise SystemExit(f"SST-2 not found in {args.sst2} (train.tsv, dev.tsv); pass --sst2")
    return args


def seed_root(args: argparse.Namespace, seed: int) -> Path:
    """The folder of one seed's runs."""
    root = args.out if seed == 0 else args.out / f"seed{seed}"  # seed 0: the folders of earlier runs
    if (args.rounds, args.local_steps, args.clients) != SCHEDULE:  # another schedule: its own runs
        root = root / f"rounds{args.rounds}-steps{args.local_steps}-clients{args.clients}"
    if args.public_fraction or args.eval_on == "validation":  # other data: never reuse those folders
        root = root / f"public{args.public_fraction:g}-{args.eval_on}"
    return root


def run_centralized(args: argparse.Namespace, seed: int, flags: list[str], central: dict) -> dict[str, float]:
    """Each base's centralized run of one seed (kept in ``central``); ``{base: final accuracy}``.
    With ``--no-centralized`` nothing runs, but a finished centralized run is still compared with."""
    per_round = args.local_steps * args.clients
    tag = f"-{args.centralized_tag}" if args.centralized_tag else ""
    finals = {}
    for base in args.bases.split(","):
        out = seed_root(args, seed) / f"centralized{base_suffix(base)}{tag}"
        if args.no_centralized:
            rows = finished(out, args.rounds)
            finals.update({base: rows[-1]["answer_accuracy"]} if rows else {})
            continue
        rows, peak = run(out, [*flags, *BASES[base], "--num-clients", "1", "--local-steps", str(per_round),
                               *shlex.split(args.centralized_flags)], args.rounds, args.finished_only)
        if rows is None:
            continue
        central.setdefault(base, {})[seed] = rows
        finals[base] = rows[-1]["answer_accuracy"]
        name = (f"centralized LoRA ({per_round} steps / round)" + ("" if base == "fp32" else f", {base} base")
                + (f" ({args.centralized_flags})" if args.centralized_flags else ""))
        print(row_line("union", f"{name}, seed {seed}", rows, peak, None), flush=True)
    return finals


def run_seed(args: argparse.Namespace, seed: int, runs: dict, central: dict, versus: dict) -> None:
    """Every job of one seed; its rows are printed and kept in ``runs`` / ``central`` (and with
    ``--against``, each run's finished plain twin on that base in ``versus``)."""
    flags = job_flags(args, seed) + (["--max-clients-per-pass", str(args.max_clients_per_pass)]
                                     if args.max_clients_per_pass else [])
    central_acc = run_centralized(args, seed, flags, central)
    root = seed_root(args, seed)
    tag = f"-{args.tag}" if args.tag else ""
    for partition in args.partitions.split(","):
        extra = ["--partition", partition] + (["--alpha", "0.5"] if partition == "dirichlet" else [])
        for strategy in args.strategies.split(","):
            for base in args.bases.split(","):
                out = root / f"{partition}-{strategy}{base_suffix(base)}{tag}"
                job = [*flags, *extra, *BASES[base], "--strategy", strategy, "--num-clients",
                       str(args.clients), "--local-steps", str(args.local_steps),
                       *(["--personal-test-fraction", str(PERSONAL_FRACTION)]
                         if REGISTERED[strategy].adapter_plan.keep else []),
                       *shlex.split(args.job_flags)]
                rows, peak = run(out, job, args.rounds, args.finished_only)
                if rows is None:
                    continue
                name = (strategy if base == "fp32" else f"{strategy}, {base} base") + (
                    f" ({args.job_flags})" if args.job_flags else "")
                setting = f"{args.clients} clients, {partition}"
                runs.setdefault((setting, name, base), {})[seed] = rows
                twin = args.against and finished(root / f"{partition}-{strategy}{base_suffix(args.against)}",
                                                 args.rounds)
                if twin:
                    versus.setdefault((setting, name, base), {})[seed] = twin
                print(row_line(setting, f"{name}, seed {seed}", rows, peak, central_acc.get(base)),
                      flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    args = parse(argv)
    print("| setting | run | answer acc per round (0 = before) | final | tail | vs centralized | final ppl |"
          " s / round (train + eval) | peak RSS |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    runs: Runs = {}
    central: dict[str, dict[int, list[dict]]] = {}
    versus: Runs = {}
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        run_seed(args, seed, runs, central, versus)
    if len(seeds) > 1 or args.against:
        print()
        print("\n".join(summary(runs, central, versus, args.against)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
