"""``fedlora-server``: run a federated job for clients on other machines.

Starts a Flower SuperLink on ``--host:--port`` (HTTP, or HTTPS with the
``--ssl-*`` files), waits for it, registers the ``--auth-keys`` of allowed nodes,
submits the fedlora app with the job below, and prints one line per round. The
results land in ``--out`` as with ``fedlora-sim``: ``metrics.jsonl``,
``config.json``, ``adapter/`` (PEFT), plus ``checkpoint.safetensors`` after every round;
``fedlora-server --resume DIR`` continues a stopped run from its last round.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

from fedlora.errors import UserError, command, first_line
from fedlora.job.checks import check_job_args
from fedlora.job.configfile import add_config_argument, parse_args
from fedlora.job.flags import Parser, add_job_arguments, flag_name, to_config
from fedlora.job.outdir import (
    RESUME_MAY_CHANGE,
    check_data_unchanged,
    check_out_dir,
    check_private_rounds,
    check_track_dir,
)
from fedlora.job.paths import same_setting
from fedlora.job.runconfig import from_dict
from fedlora.job.schema import JobConfig
from fedlora.net.tls import check_certificate, check_port_free, check_private_key, check_public_key
from fedlora.rounds.rows import format_row
from fedlora.strategies import STRATEGIES


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedlora-server", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p, num_clients_help="clients to wait for and train in each round")
    add_config_argument(p)
    net = p.add_argument_group("network and security")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default %(default)s; 0.0.0.0 for clients on other machines)")
    net.add_argument("--port", type=int, default=8000,
                     help="the SuperLink's HTTP(S) port (default %(default)s)")
    net.add_argument("--ssl-certfile", type=Path, help="server certificate (PEM)")
    net.add_argument("--ssl-keyfile", type=Path, help="server private key (PEM)")
    net.add_argument("--ssl-ca-certfile", type=Path, help="CA certificate (PEM) clients verify")
    net.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS")
    net.add_argument("--auth-keys", type=Path, nargs="+", default=None,
                     help="OpenSSH EC public keys of the nodes allowed to join (turns on node auth)")
    rnd = p.add_argument_group("rounds and faults")
    rnd.add_argument("--round-timeout", type=float, default=600.0,
                     help="seconds to wait for clients (to connect, and to reply) in a round (default"
                          " %(default)g)")
    rnd.add_argument("--min-replies", type=int, default=1,
                     help="valid replies a round needs; fewer stops the run (resumable; default %(default)s)")
    rnd.add_argument("--max-update-norm", type=float, default=1e4,
                     help="reject an uploaded tensor whose Frobenius norm exceeds this (default %(default)g)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/server"),
                     help="output folder (default %(default)s)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the results in an existing, non-empty --out folder")
    out.add_argument("--resume", type=Path, default=None, metavar="DIR",
                     help="continue the run in DIR after its last completed round (job flags are"
                          " read from DIR/config.json)")
    out.add_argument("--quiet", action="store_true", help="no per-round lines")
    return p


def check_security(args: argparse.Namespace) -> None:
    ssl = [args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile]
    if args.insecure and any(ssl):
        raise UserError("--insecure and --ssl-* files contradict each other; give one or the other")
    if not args.insecure and not all(ssl):
        raise UserError("TLS needs --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile;"
                        " or pass --insecure for plain HTTP")
    if not args.insecure:
        check_certificate(args.ssl_certfile, "--ssl-certfile")
        check_private_key(args.ssl_keyfile, "--ssl-keyfile")
        check_certificate(args.ssl_ca_certfile, "--ssl-ca-certfile")
    if args.auth_keys:
        if args.insecure:
            raise UserError("--auth-keys needs TLS (Flower refuses node auth over plain HTTP)")
        for key in args.auth_keys:
            check_public_key(key, "--auth-keys")


def check_round_settings(args: argparse.Namespace) -> None:
    """Refuse a --round-timeout or --max-update-norm that is not a finite number > 0 (0 or less timed
    every round out or rejected every upload; NaN rejected none), in one line."""
    for flag, value in (("--round-timeout", args.round_timeout), ("--max-update-norm", args.max_update_norm)):
        if not 0 < value < math.inf:
            off = " (a cap no update reaches, e.g. 1e30, turns it off)" if "norm" in flag else ""
            raise UserError(f"{flag} must be a finite number > 0, got {value}{off}")


def job_for(args: argparse.Namespace) -> tuple[JobConfig, Path]:
    """The job and output folder: from the flags, or from ``--resume DIR``."""
    if args.resume is None:
        cfg = to_config(args)
        check_job_args(cfg)
        check_out_dir(args.out, args.overwrite)
        check_track_dir(cfg, args.out)
        if args.min_replies < 1 or args.min_replies > args.num_clients:
            raise UserError(f"--min-replies must be in 1..--num-clients ({args.num_clients}),"
                            f" got {args.min_replies}")
        from fedlora.rounds.build import make_strategy  # deferred start-up import (torch)

        make_strategy(cfg)  # a strategy, option or defence that cannot be built: one line, now
        from fedlora.job.setup import check_inputs, resolve_max_length

        resolve_max_length(cfg, quiet=args.quiet)  # --task sft: once, here; clients get the number
        check_inputs(cfg)  # bad data or --max-length: one line before --out is touched
        if cfg.dp == "sample" or STRATEGIES[cfg.strategy].adapter_plan.keep:
            # a fresh run: fresh client ledgers and personal factors; --resume keeps this id
            import uuid

            cfg.dp_run_id = uuid.uuid4().hex
        return cfg, args.out
    from fedlora.rounds.checkpoint import find_checkpoint, load_checkpoint  # deferred start-up import (torch)

    if args.overwrite:
        raise UserError(f"--resume {str(args.resume)!r} continues the stopped run there and --overwrite"
                        " replaces a run's results; give one")
    if "out" in getattr(args, "typed", ()) and args.out.resolve() != args.resume.resolve():
        raise UserError(f"--resume {str(args.resume)!r} continues the run there and writes its results"
                        f" there, not to --out {str(args.out)!r}: drop --out")
    conf = args.resume / "config.json"
    if find_checkpoint(args.resume) is None or not conf.is_file():  # an older fedlora's checkpoint.pt too
        raise UserError(f"--resume {str(args.resume)!r} has no checkpoint.safetensors and config.json of a"
                        " fedlora-server run")
    try:
        saved = json.loads(conf.read_text())
    except (OSError, ValueError) as exc:  # a damaged file: one line, not json's traceback
        raise UserError(f"--resume: {str(conf)!r} cannot be read as JSON ({first_line(exc)}): restore the"
                        " run's config.json, or start a new run") from None
    cfg = resumed_job(from_dict(saved, repr(str(conf))), args)
    check_data_unchanged(cfg, load_checkpoint(args.resume, keys=("data",)).get("data") or {})
    return cfg, args.resume


def resumed_job(saved: JobConfig, args: argparse.Namespace) -> JobConfig:
    """The stopped run's job with the flags given beside ``--resume`` (``args.typed``: the fields
    whose flags the command line names, :func:`~fedlora.job.configfile.typed_fields`): fields a
    resumed run may change (:data:`~fedlora.job.checks.RESUME_MAY_CHANGE`, such as ``--rounds``)
    take them, as ``fedlora-sim --resume`` does; any other is refused. A path given another way
    (relative, where the run recorded it absolute) is no change."""
    typed = getattr(args, "typed", set())
    flags = to_config(args)
    given = {k: v for k, v in asdict(flags).items()
             if k in typed and not same_setting(flags, k, getattr(saved, k))}
    fixed = [k for k in given if k not in RESUME_MAY_CHANGE]
    if fixed:
        raise UserError(f"--resume continues the job in {str(args.resume / 'config.json')!r}, and its"
                        f" {flag_name(fixed[0])} cannot change (only"
                        f" {', '.join(flag_name(k) for k in RESUME_MAY_CHANGE)} can): drop"
                        f" {flag_name(fixed[0])}")
    cfg = replace(saved, **given)
    check_job_args(cfg)
    check_private_rounds(cfg, saved.rounds)
    return cfg


def superlink_args(args: argparse.Namespace) -> list[str]:
    out = ["--host", args.host, "--port", str(args.port)]
    if args.insecure:
        out.append("--insecure")
    else:
        out += ["--ssl-certfile", str(args.ssl_certfile), "--ssl-keyfile", str(args.ssl_keyfile),
                "--ssl-ca-certfile", str(args.ssl_ca_certfile)]
    if args.auth_keys:
        out.append("--enable-supernode-auth")
    return out


def _format(row: dict) -> str:
    extra = f"  rejected {len(row['rejected'])}" if row.get("rejected") else ""
    return format_row(row) + extra


def serve(args: argparse.Namespace, cfg: JobConfig, out_dir: Path) -> int:
    from fedlora.server.launch import launch, run_config

    rc = run_config(cfg, out_dir, resume=args.resume is not None, round_timeout=args.round_timeout,
                    min_replies=args.min_replies, max_update_norm=args.max_update_norm)

    def started(run_id: int) -> None:
        print(f"fedlora-server: run {run_id} on {args.host}:{args.port}, waiting for"
              f" {cfg.num_clients} client(s); results in {out_dir}", file=sys.stderr, flush=True)

    status = launch(rc, superlink_args(args), args.host, args.port,
                    ca=None if args.insecure else args.ssl_ca_certfile, keys=list(args.auth_keys or []),
                    on_row=lambda row: None if args.quiet else print(_format(row), flush=True),
                    on_submit=started, on_note=lambda line: print(f"fedlora-server: {line}", file=sys.stderr,
                                                                  flush=True))
    if status["state"] != "finished":
        print(f"fedlora-server: error: {status.get('error', 'run failed')}", file=sys.stderr)
        return 2 if status.get("refused") else 1  # the job refused (bad input), as fedlora-sim's exit
    print(f"wrote {out_dir / 'metrics.jsonl'} and {out_dir / 'adapter'}", file=sys.stderr)
    return 0


@command("fedlora-server")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedlora-server``."""
    args = parse_args(build_parser(), argv)  # --config FILE's fields, then the flags; args.typed
    check_security(args)
    check_round_settings(args)
    check_port_free(args.host, args.port)
    cfg, out_dir = job_for(args)
    return serve(args, cfg, out_dir)


if __name__ == "__main__":
    sys.exit(main())
