"""``fedlora-sim``: a federated LoRA run in one process on the batched core."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from fedlora.errors import UserError, command
from fedlora.job.checks import check_job_args
from fedlora.job.configfile import add_config_argument, parse_args
from fedlora.job.flags import Parser, add_job_arguments, to_config
from fedlora.job.outdir import check_out_dir, check_resume, check_track_dir
from fedlora.job.schema import JobConfig
from fedlora.job.setup import resolve_max_length
from fedlora.rounds.attacks import Attack
from fedlora.rounds.rows import format_row
from fedlora.strategies import STRATEGIES

__all__ = ["add_scale_arguments", "build_parser", "check_args", "format_row", "main", "progress_bar",
           "to_config"]


def add_scale_arguments(p: argparse.ArgumentParser, title: str = "scale") -> None:
    """Client sampling and pass size (shared with ``fedlora-compare``)."""
    scale = p.add_argument_group(title)
    scale.add_argument("--fraction", type=float, default=None,
                       help="fraction of clients sampled per round, in (0, 1] (instead of"
                            " --clients-per-round)")
    scale.add_argument("--max-clients-per-pass", type=int, default=None,
                       help="clients trained together in one forward/backward (default: on CPU as"
                            " many as fill about 4,096 tokens, --batch-size × --max-length each; on a"
                            " GPU as many as fedlora-plan's estimate fits in 80%% of the free memory)")


@contextlib.contextmanager
def progress_bar(console, quiet: bool) -> Iterator:
    """A ``rich`` progress bar of client-steps on ``console`` (none when ``quiet``; shared with
    ``fedlora-compare``). Bad input found as a run loads (a missing file, an unknown model or
    column: a :class:`UserError`) takes the bar off the screen, so the refusal is the one line
    the command prints.

    Parameters
    ----------
    console : rich.console.Console
        Where the bar and the lines printed through ``bar.console`` go.
    quiet : bool
        No bar at all.

    Yields
    ------
    rich.progress.Progress
        The bar, to add a task per run to.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=quiet) as bar:
        try:
            yield bar
        except UserError:
            bar.live.transient = True  # erased as it stops, not printed a last time
            bar.live.stop()
            bar.disable = True  # nor followed by the blank line a finished bar gets in a log
            raise


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    eng = p.add_argument_group("engine")
    eng.add_argument("--engine", choices=["batched", "flower"], default="batched",
                     help="batched: the round's clients train together over one base model (fast);"
                          " flower: Flower's simulation engine, one ClientApp call per client"
                          " (to check that both agree; needs flwr[simulation])")
    eng.add_argument("--client-cpus", type=int, default=1,
                     help="--engine flower: CPUs reserved per client call (Ray client resources; default"
                          " %(default)s)")
    eng.add_argument("--client-gpus", type=float, default=0.0,
                     help="--engine flower: GPU fraction per client call (e.g. 0.1 on a GPU)")


def add_attack_arguments(p: argparse.ArgumentParser) -> None:
    bad = p.add_argument_group("dishonest clients (batched engine; see --norm-bound, --robust-mean)")
    bad.add_argument("--attack", default="", metavar="KIND",
                     help="what clients 0..N-1 send: scale:F (their update times F), flip (its sign"
                          " flipped) or claim:N (N examples claimed)")
    bad.add_argument("--attackers", type=int, default=0, metavar="N", help="how many clients attack")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedlora-sim", description=__doc__)
    add_job_arguments(p)
    add_config_argument(p)
    add_scale_arguments(p)
    add_engine_arguments(p)
    add_attack_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/sim"), help="output folder (default %(default)s)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the results in an existing, non-empty --out folder")
    out.add_argument("--quiet", action="store_true",
                     help="print no progress bar, round lines or notes (warnings and errors still)")
    out.add_argument("--resume", action="store_true",
                     help="continue the stopped run in --out after its last checkpointed round (the same"
                          " job; --rounds may grow)")
    out.add_argument("--no-checkpoint", action="store_true",
                     help="write no checkpoint after each round (a large simulation's kept factors), so"
                          " the run cannot be resumed")
    return p


def check_args(args: argparse.Namespace) -> JobConfig:
    """The job of the flags; bad values and an existing non-empty --out folder are refused in one
    line each."""
    if args.fraction is not None:
        if args.clients_per_round is not None:
            raise UserError("--fraction and --clients-per-round both set the clients per round; give one")
        if not 0 < args.fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1], got {args.fraction}")
        args.clients_per_round = max(1, round(args.fraction * args.num_clients))
    if args.max_clients_per_pass is not None and args.max_clients_per_pass < 1:
        raise UserError(f"--max-clients-per-pass must be ≥ 1, got {args.max_clients_per_pass}")
    cfg = to_config(args)
    check_job_args(cfg)
    if getattr(args, "engine", "batched") == "flower":  # fedlora-compare has no --engine
        if args.client_cpus <= 0 or not 0 <= args.client_gpus < math.inf:  # NaN was taken, and given to Ray
            raise UserError(f"--client-cpus must be ≥ 1 and --client-gpus a finite number ≥ 0, got"
                            f" {args.client_cpus}, {args.client_gpus}")
        if args.max_clients_per_pass is not None:
            raise UserError("--max-clients-per-pass applies to --engine batched only")
        if args.attack:
            raise UserError("--attack applies to --engine batched only")
    elif args.secagg:  # the batched engine and fedlora-compare
        raise UserError("--secagg runs where clients are separate Flower nodes (fedlora-server, or"
                        " fedlora-sim --engine flower); the batched engine holds every client in one"
                        " process, so there is nothing to hide from the server")
    if getattr(args, "attack", ""):
        attack = Attack.parse(args.attack)
        if not 1 <= args.attackers <= args.num_clients:
            raise UserError(f"--attack needs --attackers between 1 and --num-clients, got {args.attackers}")
        if attack.kind != "claim" and STRATEGIES[args.strategy].heterogeneous_ranks:
            raise UserError(f"--attack {args.attack} changes an update against the global adapter, and"
                            f" --strategy {args.strategy} keeps none (its clients start from fresh or"
                            " truncated factors of their own rank): choose another strategy, or --attack"
                            " claim:N")
    elif getattr(args, "attackers", 0):
        raise UserError("--attackers N says how many clients send --attack's update: pass --attack too"
                        " (scale:F, flip or claim:N)")
    if getattr(args, "resume", False):
        if args.overwrite:
            raise UserError("--resume continues the stopped run in --out and --overwrite replaces it;"
                            " give one")
        if args.engine == "flower":
            raise UserError("--resume continues a batched run; Flower's engine keeps its clients' state in"
                            " Ray, which is gone when the run stops")
        args.resumed = check_resume(cfg, args.out)
    else:
        check_out_dir(args.out, args.overwrite)
    check_track_dir(cfg, args.out)
    resolve_max_length(cfg, quiet=getattr(args, "quiet", False))  # --task sft: from the data
    return cfg


@command("fedlora-sim")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedlora-sim``."""
    args = parse_args(build_parser(), argv)  # --config FILE's fields, then the flags
    cfg = check_args(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    from fedlora.simulations.engine import run

    console = Console(stderr=True, quiet=args.quiet)
    # with --overwrite, the earlier results are replaced once the job is built (bad input keeps them)
    if args.engine == "flower":
        from fedlora.simulations.flower_engine import run_flower

        console.print(f"{cfg.strategy}: {cfg.num_clients} clients on Flower's simulation engine")
        run_flower(cfg, args.out, on_round=lambda row: console.print(format_row(row), soft_wrap=True),
                   client_cpus=args.client_cpus, client_gpus=args.client_gpus)
        console.print(f"wrote {args.out / 'metrics.jsonl'} and {args.out / 'adapter'}", soft_wrap=True)
        return 0
    if args.resume:
        console.print(f"resuming {args.out} after round {args.resumed} of {cfg.rounds}")
    total = cfg.rounds * cfg.local_steps * cfg.per_round()  # client-steps
    with progress_bar(console, args.quiet) as bar:
        task = bar.add_task(f"{cfg.strategy}: {cfg.num_clients} clients", total=total)
        run(cfg, args.out, on_step=lambda n: bar.advance(task, n),
            on_round=lambda row: bar.console.print(format_row(row), soft_wrap=True),
            checkpoints=not args.no_checkpoint, resume=args.resume)
    console.print(f"wrote {args.out / 'metrics.jsonl'} and {args.out / 'adapter'}", soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
