"""Presentation of a comparison: per-run summaries, the Markdown/CSV table and the PNG plots.

Pure functions over the runs' metric rows (``metrics.jsonl``), used by ``fedlora-compare``
(``simulations/compare.py``) and by notebooks.
"""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["COLUMNS", "CSV_COLUMNS", "PERPLEXITY_PLOT", "PLOT_FILES", "TABLE_FILES", "human_bytes",
           "markdown_table", "plot", "summarize", "write_table"]

# (summary key, Markdown header); the CSV uses the keys as its header, plus ``strategy``.
COLUMNS = [
    ("run", "run"),
    ("final_accuracy", "final acc"),
    ("best_accuracy", "best acc"),
    ("final_personal_accuracy", "final personal acc"),
    ("bytes_up", "bytes up"),
    ("bytes_down", "bytes down"),
    ("bytes_total", "bytes up+down"),
    ("bytes_up_per_client_round", "up / client / round"),
    ("bytes_down_per_client_round", "down / client / round"),
    ("final_agg_error", "final agg error"),
    ("final_perplexity", "final ppl"),
    ("seconds", "wall s"),
]
CSV_COLUMNS = ["run", "strategy", "metric"] + [key for key, _ in COLUMNS[1:]]
TABLE_FILES = ("comparison.md", "comparison.csv")
PLOT_FILES = ("accuracy_per_round.png", "accuracy_vs_bytes.png", "bytes_per_client_round.png")
PERPLEXITY_PLOT = "perplexity_per_round.png"  # runs whose task reports perplexity (sft)
METRIC_NAMES = {"accuracy": "test accuracy", "answer_accuracy": "answer accuracy (generated)",
                "token_accuracy": "next-token accuracy",
                "answer_contains": "answers containing the reference",
                "answer_number": "answers ending with the reference's number",
                "rouge_l": "ROUGE-L F1 of the answers", "mc_accuracy": "multiple-choice accuracy",
                "reward_accuracy": "DPO reward accuracy (held-out pairs)",
                "pearson": "Pearson correlation of the predicted scores"}
#: Headline metrics that are no share of the examples (``--task regression``'s correlation): the
#: table shows their ``acc`` columns as numbers, not percentages.
UNITLESS = frozenset({"pearson"})

# ---- summaries and the table ----

def summarize(rows: list[dict], label: str | None = None, wall: float | None = None) -> dict:
    """One run's comparison figures from its metric rows (``metrics.jsonl``).

    Parameters
    ----------
    rows : list of dict
        The run's metric rows, round 0 (before training; Fed-SB's init upload) first.
    label : str, optional
        The run's name in the table; default: the rows' strategy.
    wall : float, optional
        The run's measured wall time in seconds (setup, rounds, evaluations, export); default:
        the sum of the rows' ``seconds``.

    Returns
    -------
    dict
        ``run``, ``strategy``, ``rounds``; ``final_accuracy`` (last round) and ``best_accuracy``
        (best of the scored rounds ≥ 1, or round 0 when there is no other); ``bytes_up``, ``bytes_down`` and
        ``bytes_total`` summed over all rounds, round 0 included; ``bytes_up_per_client_round`` and
        ``bytes_down_per_client_round``, the mean of the per-client byte counts over rounds ≥ 1
        (``None`` without such rounds); ``final_agg_error`` (last round's, ``None`` if not
        reported); ``final_perplexity`` (``None`` unless the task reports it);
        ``final_personal_accuracy`` (the clients' own models, ``--personal-test-fraction``; ``None``
        otherwise); ``metric``, the
        name of what ``accuracy`` measures; ``seconds``, ``wall`` or else the sum of the rows'
        seconds (setup, round 0 and evaluations included), rounded to milliseconds.
    """
    if not rows:
        raise ValueError("no metric rows to summarize")
    rows = sorted(rows, key=lambda r: r["round"])
    trained = [r for r in rows if r["round"] >= 1]
    scored = [r["accuracy"] for r in trained if r["accuracy"] is not None] or [rows[0]["accuracy"]]
    ups = [b for r in trained for b in r["bytes_up_per_client"]]
    downs = [b for r in trained for b in r["bytes_down_per_client"]]
    bytes_up = sum(r["bytes_up"] for r in rows)
    bytes_down = sum(r["bytes_down"] for r in rows)
    return {
        "run": label if label is not None else rows[0]["strategy"],
        "strategy": rows[0]["strategy"],
        "rounds": rows[-1]["round"],
        "final_accuracy": rows[-1]["accuracy"],
        "best_accuracy": max(scored),  # the rounds --eval-every scored
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "bytes_total": bytes_up + bytes_down,
        "bytes_up_per_client_round": sum(ups) / len(ups) if ups else None,
        "bytes_down_per_client_round": sum(downs) / len(downs) if downs else None,
        "final_agg_error": rows[-1]["agg_error"],
        "final_perplexity": rows[-1].get("perplexity"),
        "final_personal_accuracy": rows[-1].get("personal_accuracy"),
        "metric": rows[-1].get("metric", "accuracy"),
        "seconds": round(wall if wall is not None else sum(r["seconds"] for r in rows), 3),
    }


def human_bytes(n: float | None) -> str:
    """``1234567`` -> ``1.23 MB`` (decimal units, as in the README)."""
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _cell(key: str, value, metric: str = "accuracy") -> str:
    if value is None:
        return "-"
    if key == "run":
        return f"`{value}`"
    if key.endswith("accuracy"):
        return f"{value:.4f}" if metric in UNITLESS else f"{100 * value:.1f}%"
    if key.startswith("bytes"):
        return human_bytes(value)
    if key == "final_agg_error":
        return f"{value:.2e}"
    if key == "final_perplexity":
        return f"{value:.3g}"
    return f"{value:.1f}"


def markdown_table(summaries: list[dict]) -> str:
    """The Markdown table of :data:`COLUMNS`, one row per summary (``final ppl`` and ``final personal
    acc`` only when a run reports them: FedSA-LoRA is measured by its clients' own models)."""
    optional = ("final_perplexity", "final_personal_accuracy")
    columns = [(k, h) for k, h in COLUMNS
               if k not in optional or any(s.get(k) is not None for s in summaries)]
    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "|".join("---" if key == "run" else "---:" for key, _ in columns) + "|"]
    for s in summaries:
        metric = s.get("metric", "accuracy")
        lines.append("| " + " | ".join(_cell(key, s[key], metric) for key, _ in columns) + " |")
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
              "(Fed-SB's initialisation: by default its probes down, its clients' gradient "
              "sketches up), the per-client means are over rounds ≥ 1. Best acc is the best "
              "global-model score after a round ≥ 1, the headline each row's metric names (test "
              "accuracy; for --task sft answer accuracy, or --metric's or --eval's score; ppl: "
              "perplexity of the reference responses; --task regression: the Pearson correlation, shown as a "
              "number); agg error is ‖ΔW_agg − Σ p_k ΔW_k‖_F / "
              "‖Σ p_k ΔW_k‖_F of the last round; wall s is the run's measured wall time: setup, "
              "rounds, evaluations and export (the first run also pays one-off start-up costs).")
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


def _metric_name(runs: dict[str, list[dict]]) -> str:
    metric = next(iter(runs.values()))[-1].get("metric", "accuracy")
    return METRIC_NAMES.get(metric, metric)


def _plot_per_round(runs: dict[str, list[dict]], path: Path, key: str, name: str, title: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for label, rows in runs.items():
        rows = [r for r in sorted(rows, key=lambda r: r["round"]) if r.get(key) is not None]  # --eval-every
        ax.plot([r["round"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round (0 = before training)", ylabel=name, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _plot_accuracy_vs_bytes(runs: dict[str, list[dict]], path: Path) -> Path:
    """One line per run: its colour the strategy's, its marker the upload coding's (``--compress``)."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    colours, markers = {}, {}
    for label, rows in runs.items():
        total, xs, ys = 0, [], []
        for r in sorted(rows, key=lambda r: r["round"]):
            total += r["bytes_up"] + r["bytes_down"]
            if total > 0 and r["accuracy"] is not None:  # nothing sent yet: no place on a log axis
                xs.append(total / 1e6)
                ys.append(r["accuracy"])
        strategy = rows[0].get("strategy", label) if rows else label
        coding = next((r["compress"] for r in rows if r.get("compress")), "none")
        colour = colours.setdefault(strategy, f"C{len(colours) % 10}")
        marker = markers.setdefault(coding, "osD^v<>px*"[len(markers) % 10])
        ax.plot(xs, ys, marker=marker, color=colour, label=label)
    ax.set_xscale("log")
    ax.set(xlabel="cumulative bytes up + down (MB, log scale)", ylabel=_metric_name(runs),
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

    Runs whose rows report a perplexity (``--task sft``) also get ``perplexity_per_round.png``.
    The accuracy axes are named after the task's metric (answer accuracy for sft).

    Returns
    -------
    list of Path
        The written files.
    """
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(rows, label) for label, rows in runs.items()]
    paths = [_plot_per_round(runs, out / PLOT_FILES[0], "accuracy", _metric_name(runs), "Accuracy per round"),
             _plot_accuracy_vs_bytes(runs, out / PLOT_FILES[1]),
             _plot_bytes_per_client_round(summaries, out / PLOT_FILES[2])]
    if all(r.get("perplexity") is not None for rows in runs.values() for r in rows):
        paths.append(_plot_per_round(runs, out / PERPLEXITY_PLOT, "perplexity", "response perplexity",
                                     "Perplexity of the reference responses per round"))
    return paths
