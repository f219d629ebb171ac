"""``fedlora-compare``: several strategies on the same job, compared on accuracy and bytes sent.

Every run uses the same model, data, partition, seed and round settings (the job flags of
``fedlora-sim``); only the strategy, its default learning rate (unless ``--lr`` is given) and,
for the ``--hetero-ranks`` runs, the per-client ranks differ. Each run is written by the
simulator to ``OUT/<run>/`` (``metrics.jsonl``, ``config.json``, ``adapter/``); the comparison
goes to ``OUT/comparison.md``, ``OUT/comparison.csv`` and three PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

from fedlora.config import JobConfig, Parser, add_job_arguments, parse_ranks, to_config
from fedlora.errors import UserError
from fedlora.simulations.cli import add_scale_arguments
from fedlora.simulations.cli import check_args as check_sim_args
from fedlora.strategies import STRATEGIES

__all__ = ["COLUMNS", "build_parser", "folder_name", "main", "markdown_table", "plan_runs", "plot",
           "summarize", "write_table"]

# (summary key, Markdown header); the CSV uses the keys as its header, plus ``strategy``.
COLUMNS = [
    ("run", "run"),
    ("final_accuracy", "final acc"),
    ("best_accuracy", "best acc"),
    ("bytes_up", "bytes up"),
    ("bytes_down", "bytes down"),
    ("bytes_total", "bytes up+down"),
    ("bytes_up_per_client_round", "up / client / round"),
    ("bytes_down_per_client_round", "down / client / round"),
    ("final_agg_error", "final agg error"),
    ("seconds", "wall s"),
]
CSV_COLUMNS = ["run", "strategy"] + [key for key, _ in COLUMNS[1:]]
TABLE_FILES = ("comparison.md", "comparison.csv")
PLOT_FILES = ("accuracy_per_round.png", "accuracy_vs_bytes.png", "bytes_per_client_round.png")
ALL_STRATEGIES = ["fedavg", "flora", "lora-fair", "fed-sb"]


# ---- command line ----

def _strategies(text: str) -> list[str]:
    """``--strategies fedavg,flora``: known names, each once, at least one."""
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
    # re-adding --strategy under the "resolve" handler removes the job group's --strategy
    p.add_argument("--strategy", action=_UseStrategies, help=argparse.SUPPRESS)
    add_scale_arguments(p, "scale (as fedlora-sim; the same clients in every run)")
    comp = p.add_argument_group("comparison")
    comp.add_argument("--strategies", type=_strategies, default=list(ALL_STRATEGIES),
                      help="comma-separated strategies to run (default: fedavg,flora,lora-fair,fed-sb);"
                           " --lr, when given, applies to all of them")
    comp.add_argument("--hetero-ranks", type=_hetero_ranks, default=None,
                      help="also run every selected strategy that allows per-client ranks (flora)"
                           " with these ranks cycled over the clients, e.g. 4,8,16")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the results in an existing, non-empty --out folder")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def folder_name(label: str) -> str:
    """A run label as a folder name: ``flora (ranks 4,8,16)`` -> ``flora-ranks-4-8-16``."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", label).strip("-")


def plan_runs(args: argparse.Namespace) -> list[tuple[str, JobConfig]]:
    """The (label, config) of every run.

    One run per strategy in ``args.strategies`` (with ``--ranks`` when given), then, with
    ``--hetero-ranks``, one more per strategy that allows heterogeneous ranks, labelled
    ``flora (ranks 4,8,16)``. Each config is ``to_config`` of the flags with that strategy, so
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
    plan = []
    for label, name, ranks in specs:
        job = argparse.Namespace(**vars(args))
        job.strategy, job.ranks = name, ranks
        check_sim_args(job)  # fedlora-sim's checks: job and scale values, --out
        plan.append((label, to_config(job)))
    return plan


# ---- summaries and the table ----

def summarize(rows: list[dict], label: str | None = None) -> dict:
    """One run's comparison figures from its metric rows (``metrics.jsonl``).

    Parameters
    ----------
    rows : list of dict
        The run's metric rows, round 0 (before training; Fed-SB's init upload) first.
    label : str, optional
        The run's name in the table; default: the rows' strategy.

    Returns
    -------
    dict
        ``run``, ``strategy``, ``rounds``; ``final_accuracy`` (last round) and ``best_accuracy``
        (best of rounds ≥ 1, or round 0 when there is no other); ``bytes_up``, ``bytes_down`` and
        ``bytes_total`` summed over all rounds, round 0 included; ``bytes_up_per_client_round`` and
        ``bytes_down_per_client_round``, the mean of the per-client byte counts over rounds ≥ 1
        (``None`` without such rounds); ``final_agg_error`` (last round's, ``None`` if not
        reported); ``seconds``, the sum of the rows' seconds (setup and round 0 included),
        rounded to milliseconds as the rows are.
    """
    if not rows:
        raise ValueError("no metric rows to summarize")
    rows = sorted(rows, key=lambda r: r["round"])
    trained = [r for r in rows if r["round"] >= 1]
    ups = [b for r in trained for b in r["bytes_up_per_client"]]
    downs = [b for r in trained for b in r["bytes_down_per_client"]]
    bytes_up = sum(r["bytes_up"] for r in rows)
    bytes_down = sum(r["bytes_down"] for r in rows)
    return {
        "run": label if label is not None else rows[0]["strategy"],
        "strategy": rows[0]["strategy"],
        "rounds": rows[-1]["round"],
        "final_accuracy": rows[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in trained or rows),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "bytes_total": bytes_up + bytes_down,
        "bytes_up_per_client_round": sum(ups) / len(ups) if ups else None,
        "bytes_down_per_client_round": sum(downs) / len(downs) if downs else None,
        "final_agg_error": rows[-1]["agg_error"],
        "seconds": round(sum(r["seconds"] for r in rows), 3),
    }


def human_bytes(n: float | None) -> str:
    """``1234567`` -> ``1.23 MB`` (decimal units, as in the README)."""
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "run":
        return f"`{value}`"
    if key.endswith("accuracy"):
        return f"{100 * value:.1f}%"
    if key.startswith("bytes"):
        return human_bytes(value)
    if key == "final_agg_error":
        return f"{value:.2e}"
    return f"{value:.1f}"


def markdown_table(summaries: list[dict]) -> str:
    """The Markdown table of :data:`COLUMNS`, one row per summary."""
    lines = ["| " + " | ".join(header for _, header in COLUMNS) + " |",
             "|" + "|".join("---" if key == "run" else "---:" for key, _ in COLUMNS) + "|"]
    for s in summaries:
        lines.append("| " + " | ".join(_cell(key, s[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_table(summaries: list[dict], out: Path, notes: str | None = None) -> tuple[Path, Path]:
    """Write ``out/comparison.md`` and ``out/comparison.csv``.

    Parameters
    ----------
    summaries : list of dict
        :func:`summarize` results, one table row each, in order.
    out : Path
        The folder (created if missing).
    notes : str, optional
        Text appended to the Markdown after the table and its column legend.

    Returns
    -------
    (Path, Path)
        The Markdown and CSV files. The CSV holds the exact figures (bytes as integers, floats
        as Python writes them, an empty cell for ``None``); the Markdown rounds them for reading.
    """
    out.mkdir(parents=True, exist_ok=True)
    legend = ("Bytes are the serialized sizes of the arrays each way; totals include round 0 "
              "(Fed-SB's gradient upload), the per-client means are over rounds ≥ 1. Best acc is "
              "the best global-model accuracy after a round ≥ 1; agg error is "
              "‖ΔW_agg − Σ p_k ΔW_k‖_F / ‖Σ p_k ΔW_k‖_F of the last round; wall s is the run's "
              "setup, evaluations and rounds (the first run also pays one-off start-up costs).")
    text = "# fedlora-compare\n\n" + markdown_table(summaries) + "\n" + legend + "\n"
    if notes:
        text += "\n" + notes.rstrip() + "\n"
    md = out / "comparison.md"
    md.write_text(text)
    path = out / "comparison.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for s in summaries:
            writer.writerow(["" if s[key] is None else s[key] for key in CSV_COLUMNS])
    return md, path


# ---- plots ----

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _plot_accuracy_per_round(runs: dict[str, list[dict]], path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for label, rows in runs.items():
        rows = sorted(rows, key=lambda r: r["round"])
        ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round (0 = before training)", ylabel="test accuracy",
           title="Accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _plot_accuracy_vs_bytes(runs: dict[str, list[dict]], path: Path) -> Path:
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for label, rows in runs.items():
        total, xs, ys = 0, [], []
        for r in sorted(rows, key=lambda r: r["round"]):
            total += r["bytes_up"] + r["bytes_down"]
            if total > 0:  # nothing sent yet: no place on a log axis
                xs.append(total / 1e6)
                ys.append(r["accuracy"])
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set(xlabel="cumulative bytes up + down (MB, log scale)", ylabel="test accuracy",
           title="Accuracy vs communication")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def _plot_bytes_per_client_round(summaries: list[dict], path: Path) -> Path:
    import numpy as np

    fig, ax = _pyplot().subplots(figsize=(max(6.0, 1.6 * len(summaries) + 2), 4.5))
    x, width = np.arange(len(summaries)), 0.38
    top = max([s[k] or 0 for s in summaries
               for k in ("bytes_up_per_client_round", "bytes_down_per_client_round")] + [1])
    unit, size = next((u, v) for u, v in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1))
                      if top >= v)
    for shift, key, name in ((-width / 2, "bytes_up_per_client_round", "up"),
                             (width / 2, "bytes_down_per_client_round", "down")):
        values = [s[key] or 0 for s in summaries]
        bars = ax.bar(x + shift, [v / size for v in values], width, label=name)
        ax.bar_label(bars, labels=[human_bytes(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(x, [s["run"] for s in summaries], rotation=15 if len(summaries) > 3 else 0)
    ax.set(ylabel=f"mean per client per round ({unit})",
           title="Bytes per client per round (rounds ≥ 1)")
    ax.legend()
    return _save(fig, path)


def plot(runs: dict[str, list[dict]], out: Path) -> list[Path]:
    """Write the three comparison plots into ``out``.

    Parameters
    ----------
    runs : dict of str to list of dict
        Run label -> that run's metric rows, in table order.
    out : Path
        Folder for ``accuracy_per_round.png``, ``accuracy_vs_bytes.png`` (x: cumulative bytes
        up + down in MB, log scale; points before any byte was sent are left out) and
        ``bytes_per_client_round.png`` (grouped bars of the mean bytes up and down per client per
        round).

    Returns
    -------
    list of Path
        The written files.
    """
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(rows, label) for label, rows in runs.items()]
    return [_plot_accuracy_per_round(runs, out / PLOT_FILES[0]),
            _plot_accuracy_vs_bytes(runs, out / PLOT_FILES[1]),
            _plot_bytes_per_client_round(summaries, out / PLOT_FILES[2])]


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
        f"per-example clip {cfg.max_grad_norm or 1.0:g}"
    return f" Differential privacy: --dp {cfg.dp}, ε {cfg.epsilon:g}, δ {cfg.delta:g}, {sigma}, {clip}."


def _clear(out: Path, plan: list[tuple[str, JobConfig]]) -> None:
    """--overwrite: remove the files this command writes (not whole folders)."""
    for name in TABLE_FILES + PLOT_FILES:
        (out / name).unlink(missing_ok=True)
    for label, _ in plan:
        for name in ("metrics.jsonl", "config.json"):
            (out / folder_name(label) / name).unlink(missing_ok=True)


def run_all(plan: list[tuple[str, JobConfig]], out: Path, quiet: bool) -> dict[str, list[dict]]:
    """Run every planned job with the simulator into ``out/<folder_name(label)>/``.

    The table is rewritten after each run, so finished runs are kept if a later one fails.

    Parameters
    ----------
    plan : list of (str, JobConfig)
        From :func:`plan_runs`.
    out : Path
        The comparison folder.
    quiet : bool
        No progress bar and no per-round lines.

    Returns
    -------
    dict of str to list of dict
        Run label -> its metric rows, in plan order.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from fedlora.simulations.cli import format_row
    from fedlora.simulations.engine import run

    console = Console(stderr=True, quiet=quiet)
    runs: dict[str, list[dict]] = {}
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=quiet) as bar:
        for label, cfg in plan:
            task = bar.add_task(label, total=cfg.rounds * cfg.local_steps * len(cfg.sampled(1)))
            runs[label] = run(cfg, out / folder_name(label), on_step=lambda n, t=task: bar.advance(t, n),
                              on_round=lambda row, lb=label: bar.console.print(
                                  f"{lb}: {format_row(row)}", soft_wrap=True))
            write_table([summarize(rows, lb) for lb, rows in runs.items()], out,
                        job_notes(plan[0][1]))
    return runs


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
    args = build_parser().parse_args(argv)
    try:
        plan = plan_runs(args)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if args.out.is_dir() and args.overwrite:
            _clear(args.out, plan)
        runs = run_all(plan, args.out, args.quiet)
        plot(runs, args.out)
        if not args.quiet:
            print(markdown_table([summarize(rows, label) for label, rows in runs.items()]))
            print(f"wrote {args.out / TABLE_FILES[0]}, {TABLE_FILES[1]} and the plots "
                  f"{', '.join(PLOT_FILES)}", file=sys.stderr)
        return 0
    except UserError as exc:
        print(f"fedlora-compare: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
