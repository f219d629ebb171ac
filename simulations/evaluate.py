"""``fedlora-eval``: score a base model and exported adapters on one test file, as a run scores its
global model, and compare them in one table.

It takes the job flags an evaluation reads (``--task``, ``--model``, ``--eval mc``, ``--metric``,
``--eval-max``, the templates, ...; :data:`fedlora.job.evaluate.EVAL_FIELDS`), or a run's
``config.json`` with ``--config`` (its other fields are left out), ``--adapter`` folders written by
runs (``runs/NAME/adapter``) and ``--base`` for the bare base model; it prints one Markdown table and
writes ``OUT/eval.json``. Thin glue over :mod:`fedlora.job.evaluate`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

from fedlora.errors import command
from fedlora.job.checks import check_job_args
from fedlora.job.configfile import add_config_argument, parse_args
from fedlora.job.evaluate import EVAL_FIELDS, eval_table, score_models
from fedlora.job.flags import Parser, add_job_arguments, to_config
from fedlora.job.outdir import check_out_dir
from fedlora.rounds.jsonout import json_line

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedlora-eval", description=__doc__)
    add_config_argument(p)
    add_job_arguments(p, only=EVAL_FIELDS)
    p.set_defaults(data="")  # no --data: the examples are --test-data's
    models = p.add_argument_group("models")
    models.add_argument("--adapter", type=Path, nargs="+", default=[], metavar="DIR",
                        help="exported PEFT adapters of runs on --model (runs/NAME/adapter), scored in order")
    models.add_argument("--base", action="store_true",
                        help="also score the bare base model, first (it is scored alone without --adapter)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/eval"),
                     help="output folder, for eval.json (default %(default)s)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the results in an existing, non-empty --out folder")
    out.add_argument("--quiet", action="store_true", help="no notes on stderr")
    return p


@command("fedlora-eval")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedlora-eval``."""
    args = parse_args(build_parser(), argv, only=EVAL_FIELDS)  # --config FILE's fields, then the flags
    cfg = to_config(args)
    check_job_args(cfg)
    check_out_dir(args.out, args.overwrite)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = score_models(cfg, args.adapter, args.base, quiet=args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    job = {k: v for k, v in asdict(cfg).items() if k in EVAL_FIELDS}  # no training field: none was used
    (args.out / "eval.json").write_text(json_line({"job": job, "results": rows}, indent=1) + "\n")
    print(eval_table(rows))
    if not args.quiet:
        print(f"wrote {args.out / 'eval.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
