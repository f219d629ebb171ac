"""``fedlora-client``: one federated client on this machine.

Starts Flower's SuperNode (``python -m fedlora.clients.supernode``, isolation
``process``) against ``--server`` and runs the ClientApp's tasks in this process
(``clients/executor.py``), so the model is loaded once per run. When the SuperNode
exits (the server restarted, the network dropped) it is started again: the client
reconnects instead of exiting. Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from fedlora.data.readers import is_pattern, locate, reader_for
from fedlora.errors import UserError, command
from fedlora.job.flags import Parser
from fedlora.job.schema import DATA_FORMS
from fedlora.net.process import die_with_parent
from fedlora.net.tls import (
    check_certificate,
    check_port_free,
    check_private_key,
    free_port,
    parse_address,
    transport_hint,
)

log = logging.getLogger("fedlora.client")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedlora-client", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True, help="the fedlora-server's HOST:PORT")
    data = p.add_argument_group("data (one of)")
    data.add_argument("--data", type=Path, help=f"this client's training data: {DATA_FORMS}")
    data.add_argument("--partition-id", type=int, help="this client's share of the job's dataset")
    data.add_argument("--num-partitions", type=int, help="number of shares (with --partition-id)")
    data.add_argument("--client-id", type=int, default=None,
                      help="client number, each client its own in 0..--num-clients-1 (rank and seeds;"
                           " default: --partition-id; needed with --data)")
    sec = p.add_argument_group("security")
    sec.add_argument("--root-certificates", type=Path, help="CA certificate (PEM) of the server")
    sec.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS")
    sec.add_argument("--auth-key", type=Path,
                     help="this node's private key (its public key registered with the server)")
    p.add_argument("--runtime-port", type=int, default=None,
                   help="local port of the SuperNode's runtime API (default: a free one)")
    p.add_argument("--poll", type=float, default=0.2,
                   help="seconds between polls of the server (default %(default)s)")
    p.add_argument("--ledger-dir", type=Path, default=None,
                   help="where this client keeps its DP privacy ledger across restarts and resumed"
                        " runs (default ~/.cache/fedlora/ledgers)")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def check_args(args: argparse.Namespace) -> None:
    """One line per problem; nothing is started before these pass."""
    parse_address(args.server, "--server")
    if (args.data is None) == (args.partition_id is None):
        raise UserError("give either --data FILE or --partition-id N --num-partitions M")
    if args.data is not None:  # a file, a datasets.save_to_disk folder, a pattern or a cached hub id
        located = locate(args.data)
        if not located.exists() and not (is_pattern(located) and any(located.parent.glob(located.name))):
            raise UserError(f"--data {str(args.data)!r}: file not found")
    if args.data is not None and args.client_id is None:  # two clients must not both be client 0
        raise UserError("--data needs --client-id K: each client its own number in 0..N-1 (N the"
                        " server's --num-clients), which the server tells clients apart by")
    if args.data is not None:
        try:
            reader_for(located)  # a form it reads (not a .py file): one line now, not every round
        except UserError as exc:
            raise UserError(f"--data: {exc}") from None
    if args.client_id is not None and args.client_id < 0:
        raise UserError(f"--client-id must be ≥ 0, got {args.client_id}")
    if args.partition_id is not None:
        if args.num_partitions is None or args.num_partitions < 1:
            raise UserError("--partition-id needs --num-partitions M (M ≥ 1)")
        if not 0 <= args.partition_id < args.num_partitions:
            raise UserError(f"--partition-id must be in 0..{args.num_partitions - 1},"
                            f" got {args.partition_id}")
    if args.insecure == (args.root_certificates is not None):
        raise UserError("give --root-certificates CA.pem for TLS, or --insecure for plain HTTP")
    if args.root_certificates is not None:
        check_certificate(args.root_certificates, "--root-certificates")
    if args.auth_key is not None:
        if args.insecure:
            raise UserError("--auth-key needs TLS: pass --root-certificates instead of --insecure")
        check_private_key(args.auth_key, "--auth-key")
    if not 0 < args.poll < math.inf:  # the SuperNode's backoff cap: sleep(NaN) fails, inf never polls again
        raise UserError(f"--poll must be a finite number of seconds > 0, got {args.poll}")
    if args.runtime_port:  # 0 or none: a free one
        check_port_free("127.0.0.1", args.runtime_port, "--runtime-port")


def node_config(args: argparse.Namespace) -> str:
    """The SuperNode's ``--node-config`` (TOML values) for the ClientApp."""
    items = {}
    if args.partition_id is not None:
        items["partition-id"] = args.partition_id
        items["num-partitions"] = args.num_partitions
    if args.data is not None:
        # as this machine finds it: absolute, its links kept (a hub cache's file links to a blob
        # whose name has no suffix to tell its form by)
        items["data"] = os.path.abspath(locate(args.data).expanduser())
    client_id = args.client_id if args.client_id is not None else args.partition_id
    items["client-id"] = client_id
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in items.items())


def supernode_command(args: argparse.Namespace, runtime_port: int) -> list[str]:
    cmd = [sys.executable, "-m", "fedlora.clients.supernode", "--superlink", args.server,
           "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port),
           "--node-config", node_config(args),
           # give up on a lost SuperLink after a few tries: supervise() restarts the node,
           # which re-registers at once when the server is back (a restarted SuperLink
           # does not know the old node id anyway)
           "--max-retries", "3"]
    if args.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(args.root_certificates)]
    if args.auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(args.auth_key)]
    return cmd


def supervise(cmd: list[str], env: dict, stop: threading.Event,
              diagnose: Callable[[], None] = lambda: None) -> None:
    """Keep one SuperNode running until ``stop``; restart it when it exits, after ``diagnose()``
    (which may say why it could not talk to the server)."""
    while not stop.is_set():
        proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
        while proc.poll() is None and not stop.is_set():
            stop.wait(0.2)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
            return
        hint = " (refused: is this node's public key registered with --auth-keys?)" \
            if proc.returncode == 305 and "--auth-supernode-private-key" in cmd else ""
        log.warning("SuperNode exited (code %s)%s; reconnecting to %s", proc.returncode, hint, cmd[4])
        diagnose()
        stop.wait(1.0)


def warm_imports() -> None:
    """Import what the first task needs while the SuperNode connects (seconds on a small CPU)."""
    import flwr_datasets.partitioner  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401


@command("fedlora-client")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedlora-client``."""
    args = build_parser().parse_args(argv)
    check_args(args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.ledger_dir is not None:
        os.environ["FEDLORA_LEDGER_DIR"] = str(args.ledger_dir.expanduser().resolve())
    from fedlora.clients.app import app
    from fedlora.clients.executor import serve

    said: set[str] = set()

    def diagnose() -> None:  # at start, and when the SuperNode gives up (the server may start later)
        hint = transport_hint(*parse_address(args.server, "--server"), args.root_certificates)
        if hint is not None and hint not in said:  # else it retries, saying the server disconnected
            said.add(hint)
            log.warning("fedlora-client: %s", hint)

    diagnose()
    port = args.runtime_port or free_port()
    env = dict(os.environ, FEDLORA_SUPERNODE_POLL=str(args.poll))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    keeper = threading.Thread(target=supervise, args=(supernode_command(args, port), env, stop, diagnose),
                              daemon=True)
    keeper.start()
    log.info("fedlora-client: connecting to %s (runtime API on 127.0.0.1:%d)", args.server, port)
    warm_imports()
    try:
        serve(f"127.0.0.1:{port}", app, stop=stop)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        keeper.join(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
