"""``fedlora-sim --engine flower``: the same job through Flower's own simulation engine.

One virtual SuperNode per client, each round's ClientApp calls run by Flower's Ray
backend, one client per call: the way Flower simulates. It exists so users can
check that the batched engine and Flower agree (same global adapter for the same
job and seed), and to measure what batching saves.

Thin glue: a local ``flower-superlink --simulation`` on a free loopback port, a
private ``$FLWR_HOME``, the generated app of ``fedlora-server`` (same ServerApp and
ClientApp, same run-config keys), ``flwr run --federation-config
num-supernodes=N``, then the run is followed through ``status.json`` and
``metrics.jsonl`` as in a deployment.

Clients are **stateless** here: a Ray actor serves many virtual nodes and keeps at
most one client's model, so the server re-sends what a client would otherwise keep
(FLoRA's earlier folds, LoRA-SB's shared factors) every round, and counts those bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.net.tls import free_port
from fedlora.server.flower_transport import RESUME_ADVICE
from fedlora.server.launch import launch
from fedlora.server.launch import run_config as server_run_config

__all__ = ["run_flower"]


def _check_ray() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UserError("--engine flower needs Flower's simulation extra:"
                        " pip install 'flwr[simulation]==1.41.0' (or pip install -e '.[simulation]')")


def run_config(cfg: JobConfig, out_dir: Path, round_timeout: float) -> dict[str, object]:
    """The ServerApp's run config for ``cfg``: every sampled client must reply, clients are stateless."""
    rc = server_run_config(cfg, out_dir, round_timeout=round_timeout, min_replies=cfg.per_round(),
                           stateless=True)
    if cfg.dp == "sample":
        import uuid

        rc["dp-run-id"] = uuid.uuid4().hex  # this run's client ledgers (see clients/app.py)
    return rc


def federation_config(cfg: JobConfig, client_cpus: int, client_gpus: float) -> list[str]:
    """``flwr run --federation-config`` values: one virtual SuperNode per client."""
    return ["--federation-config", f"num-supernodes={cfg.num_clients}"
            f" client-resources-num-cpus={int(client_cpus)} client-resources-num-gpus={client_gpus}"]


def run_flower(cfg: JobConfig, out_dir: Path, on_round: Callable[[dict], None] | None = None,
               client_cpus: int = 1, client_gpus: float = 0.0,
               round_timeout: float = 1800.0) -> list[dict]:
    """Run ``cfg`` on Flower's simulation engine; the metric rows (also in ``out_dir``)."""
    _check_ray()
    home = (out_dir / ".flwr").resolve()
    port = free_port()
    rows: list[dict] = []

    def on_row(row: dict) -> None:
        rows.append(row)
        if on_round is not None:
            on_round(row)

    status = launch(run_config(cfg, out_dir, round_timeout),
                    ["--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port)], "127.0.0.1",
                    port, env={"RAY_DEDUP_LOGS": "0", "FEDLORA_LEDGER_DIR": str(home / "ledgers")},
                    run_options=federation_config(cfg, client_cpus, client_gpus), on_row=on_row,
                    on_note=lambda line: print(f"fedlora-sim: {line}", file=sys.stderr, flush=True))
    if status["state"] != "finished":  # a deployment's advice to --resume is not this engine's
        error = status.get("error", "see").removesuffix(f" {RESUME_ADVICE}")
        raise UserError(f"the Flower simulation failed: {error} ({out_dir / 'server.log'})")
    return rows
