"""``fedlora-sim``: a federated LoRA run in one process on the batched core."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedlora.config import Parser, add_job_arguments, check_job_args, check_out_dir, to_config
from fedlora.errors import UserError

__all__ = ["build_parser", "check_args", "main", "to_config"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedlora-sim", description=__doc__)
    add_job_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/sim"), help="output folder")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the results in an existing, non-empty --out folder")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values and an existing non-empty --out folder, in one line each."""
    check_job_args(args)
    check_out_dir(args.out, args.overwrite)


def format_row(row: dict) -> str:
    err = "-" if row["agg_error"] is None else f"{row['agg_error']:.2e}"
    return (f"round {row['round']:>3}  acc {row['accuracy']:.4f}  loss {row['loss']:.4f}  "
            f"agg_err {err}  up {row['bytes_up'] / 1e6:.2f} MB  "
            f"down {row['bytes_down'] / 1e6:.2f} MB  {row['seconds']:.1f}s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedlora-sim``."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        cfg = to_config(args)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        from fedlora.simulations.engine import run

        console = Console(stderr=True, quiet=args.quiet)
        if args.out.is_dir() and args.overwrite:
            for name in ("metrics.jsonl", "config.json"):
                (args.out / name).unlink(missing_ok=True)
        total = cfg.rounds * cfg.local_steps
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      disable=args.quiet) as bar:
            task = bar.add_task(f"{cfg.strategy}: {cfg.num_clients} clients", total=total)
            run(cfg, args.out, on_step=lambda: bar.advance(task),
                on_round=lambda row: bar.console.print(format_row(row), soft_wrap=True))
        console.print(f"wrote {args.out / 'metrics.jsonl'} and {args.out / 'adapter'}")
        return 0
    except UserError as exc:
        print(f"fedlora-sim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
