"""Compressed updates: bytes and final accuracy of ``--compress`` / ``--compress-down`` against float32.

Settings (each a ``fedlora-sim`` job, one at a time, in ``OUT/<setting>/<strategy>-<coding>/``):

* ``bbc``: the BBC News defaults (MiniLM, 10 clients, 3 rounds, 10 local steps of 8 × 64 tokens),
  FedAvg and Fed-SB, uploads as float32 (``none``), ``int8`` and ``topk:0.1`` (error feedback on);
* ``sst2``: MiniLM over SST-2's training phrases (``../shared/data/sst2/train.tsv``, IID over 10
  clients, 3 rounds, ``--max-length 32``), scored on its 872 dev sentences, FedAvg, the same codings;
* ``flora``: FLoRA on the BBC defaults, whose download (the stacked fold) dominates: float32,
  ``--compress-down int8``, and ``--compress int8 --compress-down int8``.

The table reports per run the bytes up and down of the training rounds (rounds ≥ 1; Fed-SB's
round-0 sketches, coded as one-shot uploads, are in the all-rounds ratio), each as a share of the
same job in float32, the final accuracy and its difference from float32's in points, and the
last round's ``compress_error``. Finished runs are reused (``--report-only`` only prints).
SmolLM2 SFT with ``--compress nf4`` is CPU-hours and is not run here.

Run: ``nice -n 5 python benchmarks/compression.py --out runs/compression`` (its ``bbc`` setting took
74 min on a shared 2-core CPU; ``--only sst2,flora`` runs the others).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stats import read_rows

ROOT = Path(__file__).resolve().parents[1]
CODINGS = {"none": [], "int8": ["--compress", "int8"], "topk:0.1": ["--compress", "topk:0.1"]}
FLORA = {"none": [], "down-int8": ["--compress-down", "int8"],
         "int8+down-int8": ["--compress", "int8", "--compress-down", "int8"]}


def settings(data_dir: Path) -> dict[str, tuple[list[str], list[str], dict[str, list[str]]]]:
    """name -> (job flags, strategies, codings)."""
    sst2 = ["--data", str(data_dir / "train.tsv"), "--text-column", "sentence", "--test-data",
            str(data_dir / "dev.tsv"), "--test-text-column", "content", "--max-length", "32",
            "--eval-batch-size", "256"]
    return {"bbc": ([], ["fedavg", "fed-sb"], CODINGS), "sst2": (sst2, ["fedavg"], CODINGS),
            "flora": ([], ["flora"], FLORA)}


def wall_of(out: Path) -> float:
    return json.loads((out / "wall.json").read_text())["seconds"] if (out / "wall.json").is_file() else 0.0


def run(flags: list[str], out: Path) -> float:
    """One ``fedlora-sim`` job (skipped when ``out`` holds a finished one): its wall seconds."""
    from fedlora.simulations.cli import main as sim
    if (out / "adapter").is_dir() and (out / "metrics.jsonl").is_file():
        return wall_of(out)
    t0 = time.perf_counter()
    if sim([*flags, "--num-clients", "10", "--rounds", "3", "--quiet", "--overwrite", "--out", str(out)]):
        raise SystemExit(f"compression: the run in {out} failed")
    wall = time.perf_counter() - t0
    (out / "wall.json").write_text(json.dumps({"seconds": wall}))
    return wall


def summary(out: Path) -> dict:
    rows = read_rows(out)
    train = [r for r in rows if r["round"] >= 1]
    return {"up": sum(r["bytes_up"] for r in train), "down": sum(r["bytes_down"] for r in train),
            "up_all": sum(r["bytes_up"] for r in rows), "accuracy": rows[-1]["accuracy"],
            "error": rows[-1].get("compress_error")}


def table(root: Path, plan: dict) -> list[str]:
    lines = ["| setting | strategy | coding | up (MB) | up / fp32 | up / fp32 (all rounds) | down / fp32 |"
             " final acc | Δ acc (points) | compress_error | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (_, strategies, codings) in plan.items():
        for strategy in strategies:
            base = root / name / f"{strategy}-none"
            if not (base / "adapter").is_dir():  # finished runs only
                continue
            b = summary(base)
            for coding in codings:
                out = root / name / f"{strategy}-{coding.replace(':', '')}"
                if not (out / "adapter").is_dir():
                    continue
                s = summary(out)
                err = "—" if s["error"] is None else f"{s['error']:.4f}"
                lines.append(f"| {name} | {strategy} | {coding} | {s['up'] / 1e6:.2f} |"
                             f" {s['up'] / b['up']:.1%} | {s['up_all'] / b['up_all']:.1%} |"
                             f" {s['down'] / b['down']:.1%} |"
                             f" {s['accuracy']:.4f} | {100 * (s['accuracy'] - b['accuracy']):+.2f} | {err} |"
                             f" {wall_of(out):.0f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/compression")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    p.add_argument("--only", default="", help="comma-separated settings (bbc, sst2, flora)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    plan = settings(Path(args.data_dir))
    if args.only:
        plan = {k: v for k, v in plan.items() if k in args.only.split(",")}
    root = Path(args.out)
    if not args.report_only:
        for name, (flags, strategies, codings) in plan.items():
            for strategy in strategies:
                for coding, extra in codings.items():
                    out = root / name / f"{strategy}-{coding.replace(':', '')}"
                    wall = run([*flags, "--strategy", strategy, *extra], out)
                    print(f"compression: {name} {strategy} {coding}: {wall:.0f} s", file=sys.stderr,
                          flush=True)
    print("\n".join(table(root, plan)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
