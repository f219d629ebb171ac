"""The Flower ``ServerApp``: ``flwr run .`` or ``fedlora-server`` start it on a SuperLink.

It reads the job from the run config (the ``fedlora-sim`` flag names, see
``fedlora.config``), builds a one-slot model to evaluate the global adapter on the
held-out split, runs :class:`fedlora.server.strategy.FedLoRA`, and writes
``metrics.jsonl``, ``config.json``, ``checkpoint.pt``, ``adapter/`` and
``status.json`` (``running`` / ``finished`` / ``failed`` with the reason) into the
run config's ``out`` folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import JobConfig, from_run_config
from fedlora.export import export_peft
from fedlora.process import die_with_parent
from fedlora.rounds import CHECKPOINT, Coordinator, make_strategy
from fedlora.server.ingress import write_limit
from fedlora.server.strategy import FedLoRA, RoundSettings
from fedlora.server.transport import fast_object_pulls
from fedlora.setup import build_model, public_data, splits
from fedlora.tasks import get_task
from fedlora.validate import request_limit

app = ServerApp()
log = logging.getLogger("fedlora.server")


def write_status(out_dir: Path, state: str, **extra) -> None:
    """``status.json``, replaced atomically (``fedlora-server`` polls it)."""
    tmp = out_dir / ".status.json.tmp"
    tmp.write_text(json.dumps({"state": state, **extra}) + "\n")
    os.replace(tmp, out_dir / "status.json")


def build_coordinator(cfg: JobConfig) -> tuple[Coordinator, str, list[str]]:
    """Server-side model (one slot), held-out examples and coordinator for ``cfg``."""
    task, strategy = get_task(cfg.task), make_strategy(cfg)
    _, test_ds, label_names = splits(cfg, task)
    fm, tokenizer, path = build_model(cfg, [cfg.rank], strategy.plan(1), len(label_names))
    return (Coordinator(cfg, strategy, fm, task.eval_set(tokenizer, test_ds, cfg),
                        public_data(cfg, task, tokenizer, label_names)), path, label_names)


def lock_out_dir(out_dir: Path, timeout: float = 60.0):
    """Hold ``out_dir/.lock`` for this process's lifetime: one writer per output folder.

    A ServerApp left over from a killed server keeps writing until it notices; a
    resumed run waits for it to go (at most ``timeout`` s) instead of interleaving.
    """
    import fcntl

    fh = (out_dir / ".lock").open("a")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"another ServerApp is still writing to {out_dir}") from None
            time.sleep(0.2)


def run_server(grid, run_config: dict, run_id: int = 0) -> None:
    """The whole server side of a run (also callable without Flower's process wrapper)."""
    cfg = from_run_config(run_config)
    out_dir = Path(str(run_config["out"])).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_out_dir(out_dir)
    status = {"run_id": str(run_id), "pid": os.getpid()}
    write_status(out_dir, "running", **status)
    try:
        coord, model_path, labels = build_coordinator(cfg)
        # the SuperLink's limit on client pushes (ingress.py)
        write_limit(out_dir, request_limit(coord.fm, cfg, coord.plan, coord.strategy.init_releases > 0))
        ckpt = out_dir / CHECKPOINT
        if bool(run_config.get("resume", False)) and ckpt.is_file():
            coord.restore(ckpt)
            _rewrite_metrics(out_dir, coord.rows)
            log.info("resuming after round %d", coord.round)
        else:
            (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
            (out_dir / "metrics.jsonl").write_text("")
        strategy = FedLoRA(coord, RoundSettings.from_run_config(run_config), out_dir, labels)
        strategy.start(grid)
        export_peft(coord.state, list(coord.fm.adapters), out_dir / "adapter", model_path,
                    coord.task.peft_task_type, list(coord.fm.heads))
    except BaseException as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        write_status(out_dir, "failed", error=reason, **status)
        raise
    write_status(out_dir, "finished", rounds=coord.round, **status)
    lock.close()


def _rewrite_metrics(out_dir: Path, rows: list[dict]) -> None:
    tmp = out_dir / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out_dir / "metrics.jsonl")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    die_with_parent()  # no orphan ServerApp writing into --out after its SuperLink is gone
    fast_object_pulls(RoundSettings.from_run_config(dict(context.run_config)).round_timeout)
    run_server(grid, dict(context.run_config), context.run_id)
