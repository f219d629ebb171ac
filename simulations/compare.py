"""``fedlora-compare``: several strategies on the same job, compared on accuracy and bytes sent.

Every run uses the same model, data, partition, seed and round settings (the job flags of
``fedlora-sim``); only the strategy, its default learning rate (unless ``--lr`` is given) and,
for the ``--hetero-ranks`` runs, the per-client ranks differ. Each run is written by the
simulator to ``OUT/<run>/`` (``metrics.jsonl``, ``config.json``, ``adapter/``); the comparison
goes to ``OUT/comparison.md``, ``OUT/comparison.csv`` and three PNG plots (a fourth, of
perplexity, where every run reports one: ``--task sft``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import os
import re
import shutil
import sys
import time
from pathlib import Path

from fedlora.errors import UserError, command
from fedlora.job.configfile import add_config_argument, parse_args
from fedlora.job.flags import Parser, add_job_arguments
from fedlora.job.schema import JobConfig, parse_ranks
from fedlora.rounds.tracking import Tracking
from fedlora.simulations.cli import add_scale_arguments, format_row, progress_bar
from fedlora.simulations.cli import check_args as check_sim_args
from fedlora.simulations.report import (
    COLUMNS,
    CSV_COLUMNS,
    PERPLEXITY_PLOT,
    PLOT_FILES,
    TABLE_FILES,
    markdown_table,
    plot,
    summarize,
    write_table,
)
from fedlora.strategies import STRATEGIES

__all__ = ["COLUMNS", "CSV_COLUMNS", "build_parser", "folder_name", "main", "markdown_table", "plan_runs",
           "plot", "summarize", "write_table"]  # the table and plots live in simulations/report.py

ALL_STRATEGIES = ["fedavg", "flora", "lora-fair", "fed-sb"]


# ---- command line ----

def _strategies(text: str) -> list[str]:
    """``--strategies fedavg,flora``: registered names, each once, at least one; ``all``: every
    registered strategy."""
    if text.strip() == "all":
        return list(STRATEGIES)
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"takes strategy names like fedavg,flora, got {text!r}")
    for name in names:
        if name not in STRATEGIES:
            raise argparse.ArgumentTypeError(
                f"unknown strategy {name!r}; choose from {', '.join(sorted(STRATEGIES))}")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"lists a strategy twice: {text!r}")
    return names


def _hetero_ranks(text: str) -> list[int]:
    """``--hetero-ranks 4,8,16``: positive integers."""
    return parse_ranks(text, "--hetero-ranks")


class _UseStrategies(argparse.Action):
    """``--strategy`` is fedlora-sim's flag; say which flag to use instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is fedlora-sim's flag; use --strategies {values}")


def build_parser() -> argparse.ArgumentParser:
    """``fedlora-sim``'s job flags with ``--strategy`` replaced by ``--strategies``."""
    p = Parser(prog="fedlora-compare", description=__doc__, conflict_handler="resolve",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    add_config_argument(p)
    # re-adding --strategy under the "resolve" handler removes the job group's --strategy
    p.add_argument("--strategy", action=_UseStrategies, help=argparse.SUPPRESS)
    add_scale_arguments(p, "scale (as fedlora-sim; the same clients in every run)")
    comp = p.add_argument_group("comparison")
    comp.add_argument("--strategies", type=_strategies, default=list(ALL_STRATEGIES),
                      help="comma-separated strategies to run, or all (registered: "
                           + ", ".join(STRATEGIES) + "; default: " + ",".join(ALL_STRATEGIES)
                           + "); --lr, when given, applies to all of them")
    comp.add_argument("--hetero-ranks", type=_hetero_ranks, default=None,
                      help="also run every selected strategy that allows per-client ranks (flora, flexlora)"
                           " with these ranks cycled over the clients, e.g. 4,8,16")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/compare"),
                     help="output folder (default %(default)s)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the results in an existing, non-empty --out folder")
    out.add_argument("--quiet", action="store_true",
                     help="print no progress bar, round lines, table or notes (warnings and errors still)")
    return p


def folder_name(label: str) -> str:
    """A run label as a folder name: ``flora (ranks 4,8,16)`` -> ``flora-ranks-4-8-16``."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", label).strip("-")


def plan_runs(args: argparse.Namespace) -> list[tuple[str, JobConfig]]:
    """The (label, config) of every run.

    One run per strategy in ``args.strategies`` (with ``--ranks`` when given), then, with
    ``--hetero-ranks``, one more per strategy that allows heterogeneous ranks, labelled
    ``flora (ranks 4,8,16)``; with several ``--compress`` codings, each of those per coding,
    labelled ``fedavg + int8``. Each config is ``to_config`` of the flags with that strategy, so
    the default ``--lr`` is the strategy's.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed :func:`build_parser` flags.

    Returns
    -------
    list of (str, JobConfig)
        Run label and job, in table order.

    Raises
    ------
    UserError
        A bad job or scale value (fedlora-sim's checks, an existing non-empty ``--out``
        without ``--overwrite`` included), ``--hetero-ranks`` with no strategy that allows it, or different
        ``--ranks`` for a strategy that needs one rank.
    """
    hetero = [s for s in args.strategies if STRATEGIES[s].heterogeneous_ranks]
    if args.hetero_ranks is not None and not hetero:
        allowing = sorted(s for s in STRATEGIES if STRATEGIES[s].heterogeneous_ranks)
        raise UserError(f"--hetero-ranks needs a strategy that allows per-client ranks"
                        f" ({', '.join(allowing)}) in --strategies {','.join(args.strategies)}")
    fixed = [s for s in args.strategies if not STRATEGIES[s].heterogeneous_ranks]
    if args.ranks is not None and len(set(args.ranks)) > 1 and fixed:
        raise UserError(f"--ranks {','.join(map(str, args.ranks))} gives clients different ranks,"
                        f" which {', '.join(fixed)} cannot aggregate; use --rank, and --hetero-ranks"
                        " for the extra per-client-rank runs")
    specs = [(name, name, args.ranks) for name in args.strategies]
    if args.hetero_ranks is not None:
        text = ",".join(str(r) for r in args.hetero_ranks)
        specs += [(f"{name} (ranks {text})", name, args.hetero_ranks) for name in hetero]
    codings = compress_grid(args.compress)
    plan = []
    for label, name, ranks in specs:
        for coding in codings:  # --compress none,int8,topk:0.1: strategy × compression
            job = argparse.Namespace(**vars(args))
            job.strategy, job.ranks, job.compress = name, ranks, coding
            run = label if codings == ["none"] else f"{label} + {coding}"
            plan.append((run, check_sim_args(job)))  # fedlora-sim's checks: job and scale values, --out
    return plan


def compress_grid(text: str) -> list[str]:
    """``--compress none,int8,topk:0.1``: the upload codings every strategy runs with, each once (each
    checked with the job, :func:`fedlora.job.checks.check_compress_args`)."""
    codings = [c.strip() for c in (text or "none").split(",") if c.strip()]
    if not codings or len(set(codings)) < len(codings):
        raise UserError(f"--compress takes codings like none,int8,topk:0.1, each once; got {text!r}")
    return codings


# ---- running ----

def job_notes(cfg: JobConfig) -> str:
    """One line naming the settings every run shares."""
    return (f"Same job for every run: model `{cfg.model}`, data `{cfg.data}`, {cfg.num_clients} clients "
            f"({cfg.partition} partition), {cfg.rounds} rounds of {cfg.local_steps} local steps, "
            f"batch {cfg.batch_size}, max length {cfg.max_length}, rank {cfg.rank}, seed {cfg.seed}, "
            f"device {cfg.device}.{_dp_note(cfg)}")


def _dp_note(cfg: JobConfig) -> str:
    if cfg.dp == "none":
        return ""
    sigma = f"σ {cfg.noise_multiplier:g}" if cfg.noise_multiplier > 0 else "σ calibrated"
    clip = f"update clip {cfg.update_clip:g}" if cfg.dp == "client" else \
        f"per-example clip {cfg.max_grad_norm:g}" if cfg.max_grad_norm else \
        f"per-example clip measured on --init-data (quantile {cfg.clip_quantile:g})"
    return f" Differential privacy: --dp {cfg.dp}, ε {cfg.epsilon:g}, δ {cfg.delta:g}, {sigma}, {clip}."


def _clear(out: Path, plan: list[tuple[str, JobConfig]]) -> None:
    """--overwrite: remove the files this command writes: the table, the plots and its runs' rows;
    the runs of the comparison it replaces (its ``comparison.csv``'s) that this one does not run go
    whole, their run folders and TensorBoard folders, so none is left beside the new table."""
    table = out / TABLE_FILES[1]
    with contextlib.suppress(OSError, csv.Error, KeyError):
        with table.open(newline="") as fh:
            gone = {row["run"] for row in csv.DictReader(fh)} - {label for label, _ in plan}
            for label in gone:
                for folder in (out / folder_name(label), out / "tensorboard" / folder_name(label)):
                    shutil.rmtree(folder, ignore_errors=True)
    for name in (*TABLE_FILES, *PLOT_FILES, PERPLEXITY_PLOT):  # every plot an earlier comparison wrote
        (out / name).unlink(missing_ok=True)
    for label, _ in plan:
        for name in ("metrics.jsonl", "config.json"):
            (out / folder_name(label) / name).unlink(missing_ok=True)


def _begun(label: str, cfg: JobConfig, out: Path, plan: list[tuple[str, JobConfig]],
           tracked: dict[str, Tracking | None], clear: bool) -> Tracking | None:
    """Run ``label``'s job is set up: with ``clear`` (``--overwrite``, the first run) this command's
    files of an earlier comparison go now, not before a refusal; its trackers open (kept in
    ``tracked``)."""
    if clear:
        _clear(out, plan)
    tracked[label] = Tracking.open(cfg, out, run=label, subdir=folder_name(label),
                                   experiment=out.resolve().name)
    return tracked[label]


def run_all(plan: list[tuple[str, JobConfig]], out: Path, quiet: bool,
            tracked: dict[str, Tracking | None], overwrite: bool = False) -> dict[str, list[dict]]:
    """Run every planned job with the simulator into ``out/<folder_name(label)>/``.

    The table is rewritten after each run, so finished runs are kept if a later one fails. With
    ``--track``, each run is a run of its own in the experiment named after ``out``, its tracker files
    under ``out`` (``tensorboard/<folder_name(label)>``, ``mlruns``, ``wandb``).

    Parameters
    ----------
    plan : list of (str, JobConfig)
        From :func:`plan_runs`.
    out : Path
        The comparison folder.
    quiet : bool
        No progress bar and no per-round lines.
    tracked : dict
        Filled with each finished run's trackers (label -> Tracking), left open for the plots; a run
        that fails closes its own.
    overwrite : bool
        ``--overwrite``: this command's files of an earlier comparison in ``out`` are removed once the
        first run's job is set up (a refused job leaves them as they were).

    Returns
    -------
    (dict of str to list of dict, dict of str to float)
        Run label -> its metric rows, in plan order; run label -> its measured wall seconds.
    """
    from rich.console import Console

    from fedlora.simulations.engine import run

    console = Console(stderr=True, quiet=quiet)
    runs: dict[str, list[dict]] = {}
    walls: dict[str, float] = {}
    with progress_bar(console, quiet) as bar:
        for label, cfg in plan:
            task = bar.add_task(label, total=cfg.rounds * cfg.local_steps * cfg.per_round())
            t0 = time.perf_counter()
            begun = functools.partial(_begun, label, cfg, out, plan, tracked, overwrite and not runs)
            try:
                runs[label] = run(cfg, out / folder_name(label), on_step=lambda n, t=task: bar.advance(t, n),
                                  on_round=lambda row, lb=label: bar.console.print(
                                      f"{lb}: {format_row(row)}", soft_wrap=True), tracking=begun)
            except BaseException:
                if tracked.get(label) is not None:
                    tracked.pop(label).close(failed=True)
                raise
            walls[label] = time.perf_counter() - t0
            write_table([summarize(rows, lb, walls[lb]) for lb, rows in runs.items()], out,
                        job_notes(plan[0][1]))
    return runs, walls


@command("fedlora-compare")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedlora-compare``.

    Parameters
    ----------
    argv : list of str, optional
        The flags (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 2 on bad input (one line on stderr; argparse's own errors exit 2 too).
    """
    args = parse_args(build_parser(), argv)  # --config FILE's fields, then the flags
    plan = plan_runs(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tracked: dict[str, Tracking | None] = {}  # --track: every run's trackers, which keep the plots too
    plots: list[Path] = []
    try:
        runs, walls = run_all(plan, args.out, args.quiet, tracked, args.overwrite and args.out.is_dir())
        plots = plot(runs, args.out)
    finally:  # the finished runs' trackers end as finished, with the plots when there are some
        for tracking in tracked.values():
            if tracking is not None:
                tracking.finish({"plots": plots} if plots else {})
    if not args.quiet:
        print(markdown_table([summarize(rows, label, walls[label]) for label, rows in runs.items()]))
        print(f"wrote {args.out / TABLE_FILES[0]}, {TABLE_FILES[1]} and the plots "
              f"{', '.join(p.name for p in plots)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
