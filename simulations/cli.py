"""``fedlora-sim``: a federated LoRA run in one process on the batched core."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedlora.errors import UserError
from fedlora.strategies import STRATEGIES


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks takes integers like 4,8,16, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"--ranks takes positive integers, got {text!r}")
    return ranks


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedlora-sim", description=__doc__)
    job = p.add_argument_group("job")
    job.add_argument("--strategy", choices=sorted(STRATEGIES), default="fedavg")
    job.add_argument("--num-clients", type=int, default=10)
    job.add_argument("--rounds", type=int, default=3)
    job.add_argument("--local-steps", type=int, default=10)
    job.add_argument("--batch-size", type=int, default=8, help="examples per client per step")
    job.add_argument("--lr", type=float, default=None,
                     help="local AdamW learning rate (default: 1e-2 for fed-sb, which trains only"
                          " the r×r cores, 2e-3 for the others)")
    job.add_argument("--rank", type=int, default=8)
    job.add_argument("--ranks", type=_ranks, default=None,
                     help="per-client ranks, cycled over clients (e.g. 4,8,16); flora only")
    job.add_argument("--lora-alpha", type=float, default=16.0)
    job.add_argument("--target-modules", nargs="+", default=None,
                     help="module names or regexes to adapt (default: attention query/value)")
    job.add_argument("--seed", type=int, default=0)
    job.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto")
    data = p.add_argument_group("data and model")
    data.add_argument("--model", default="minilm",
                      help="'minilm' (bundled all-MiniLM-L6-v2) or a local model folder")
    data.add_argument("--task", choices=["classification", "causal-lm"], default="classification")
    data.add_argument("--data", default="bbcnews",
                      help="'bbcnews' (bundled) or a .csv/.tsv/.jsonl file")
    data.add_argument("--text-column", default="text")
    data.add_argument("--label-column", default="label")
    data.add_argument("--partition", choices=["iid", "dirichlet"], default="iid")
    data.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    data.add_argument("--max-length", type=int, default=64, help="tokens per example")
    data.add_argument("--test-fraction", type=float, default=0.2)
    strat = p.add_argument_group("strategy options")
    strat.add_argument("--fair-lambda", type=float, default=0.01, help="LoRA-FAIR λ")
    strat.add_argument("--sb-init-lr", type=float, default=1e-3,
                       help="Fed-SB: η of the approximated first step −η·sign(G)")
    strat.add_argument("--init-batches", type=int, default=2,
                       help="Fed-SB: local batches per client for the gradient estimate")
    strat.add_argument("--max-grad-norm", type=float, default=None,
                       help="clip each client's gradient norm per step")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/sim"), help="output folder")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the results in an existing, non-empty --out folder")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values and an existing non-empty --out folder, in one line each."""
    positive = ("num_clients", "rounds", "local_steps", "batch_size", "rank", "max_length",
                "init_batches")
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.lr is not None and args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.ranks is not None and not STRATEGIES[args.strategy].heterogeneous_ranks:
        if len(set(args.ranks)) > 1:
            raise UserError(f"--strategy {args.strategy} needs one rank for every client;"
                            " use --rank, or --strategy flora for heterogeneous ranks")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {str(args.out)!r} is a file; pass a folder")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {str(args.out)!r} already has results; pass --overwrite to"
                        " replace them or choose another folder")


def default_lr(strategy: str) -> float:
    """Fed-SB trains only R (r×r per layer) and wants a larger step than LoRA's A and B."""
    return 1e-2 if strategy == "fed-sb" else 2e-3


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; refuse an unavailable CUDA device."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown --device {name!r}; use cpu, cuda, cuda:N or auto")
    return name


def to_config(args: argparse.Namespace):
    """The :class:`SimConfig` for parsed flags."""
    from fedlora.simulations.engine import SimConfig

    ranks = None
    if args.ranks is not None:
        ranks = [args.ranks[k % len(args.ranks)] for k in range(args.num_clients)]
    return SimConfig(
        strategy=args.strategy, model=args.model, data=args.data, task=args.task,
        text_column=args.text_column, label_column=args.label_column,
        num_clients=args.num_clients, rounds=args.rounds, local_steps=args.local_steps,
        batch_size=args.batch_size, lr=args.lr if args.lr is not None else default_lr(args.strategy),
        rank=args.rank, ranks=ranks,
        lora_alpha=args.lora_alpha, target_modules=args.target_modules,
        partition=args.partition, alpha=args.alpha, max_length=args.max_length,
        test_fraction=args.test_fraction, seed=args.seed, device=resolve_device(args.device),
        init_batches=args.init_batches, fair_lambda=args.fair_lambda,
        sb_init_lr=args.sb_init_lr, max_grad_norm=args.max_grad_norm,
    )


def _format(row: dict) -> str:
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
                on_round=lambda row: bar.console.print(_format(row), soft_wrap=True))
        console.print(f"wrote {args.out / 'metrics.jsonl'} and {args.out / 'adapter'}")
        return 0
    except UserError as exc:
        print(f"fedlora-sim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
