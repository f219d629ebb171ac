"""The Flower ``ServerApp``: ``flwr run .`` or ``fedlora-server`` start it on a SuperLink.

It reads the job from the run config (the ``fedlora-sim`` flag names, see
``fedlora.job``), builds a one-slot model to evaluate the global adapter on the
held-out split, runs the round loop (:mod:`fedlora.rounds.loop`) over
:class:`fedlora.server.flower_transport.FlowerTransport`, and writes
``metrics.jsonl``, ``config.json``, ``checkpoint.safetensors``, ``adapter/`` and
``status.json`` (``running`` / ``finished`` / ``failed`` with the reason) into the
run config's ``out`` folder.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.errors import UserError, listening
from fedlora.job.checks import check_job_args
from fedlora.job.outdir import check_track_dir
from fedlora.job.runconfig import from_run_config
from fedlora.job.schema import JobConfig
from fedlora.job.setup import build_model, prepared, public_data, splits
from fedlora.models.export import export_model
from fedlora.net.process import die_with_parent
from fedlora.rounds import loop
from fedlora.rounds.build import make_strategy
from fedlora.rounds.checkpoint import find_checkpoint
from fedlora.rounds.coordinator import Coordinator
from fedlora.rounds.sink import RunFolder
from fedlora.rounds.tracking import Tracking
from fedlora.rounds.validate import request_limit
from fedlora.server.flower_transport import FlowerTransport, RoundSettings
from fedlora.server.ingress import write_limit
from fedlora.server.launch import LOG_FILE, restart_log
from fedlora.server.polling import fast_object_pulls
from fedlora.tasks import get_task

app = ServerApp()
log = logging.getLogger("fedlora.server")


def build_coordinator(cfg: JobConfig) -> tuple[Coordinator, str, list[str]]:
    """Server-side model (one slot), held-out examples and coordinator for ``cfg``."""
    task, strategy = get_task(cfg.task), make_strategy(cfg)
    _, test_ds, label_names = splits(cfg, task)
    fm, tokenizer, path = build_model(cfg, [cfg.rank], strategy.plan(1), len(label_names), label_names)
    test = prepared(task, fm, cfg, task.eval_set(tokenizer, test_ds, cfg))
    public = prepared(task, fm, cfg, public_data(cfg, task, tokenizer, label_names))
    return Coordinator(cfg, strategy, fm, test, public), path, label_names


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
    """The whole server side of a run (also callable without Flower's process wrapper): the round
    loop of every engine over the Flower transport, into the run config's ``out`` folder."""
    out_dir = Path(str(run_config["out"])).expanduser().resolve()
    sink = RunFolder(out_dir, checkpoints=True, on_round=_log_round)
    lock = lock_out_dir(out_dir)
    start = (out_dir / LOG_FILE).stat().st_size if (out_dir / LOG_FILE).is_file() else 0
    logged = logging.FileHandler(out_dir / LOG_FILE)  # fedlora-server shows its warnings
    logged.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logged.setLevel(logging.INFO)
    logging.getLogger("fedlora").addHandler(logged)
    status = {"run_id": str(run_id), "pid": os.getpid()}
    sink.status("running", **status)
    try:
        cfg = from_run_config(run_config)
        check_job_args(cfg)  # the run config's job, checked once as fedlora-sim checks its flags
        if cfg.attack:
            raise UserError("attack is simulated by fedlora-sim's batched engine only; a deployment's"
                            " clients are what they are: drop it from the run config")
        check_track_dir(cfg, out_dir)
        coord, model_path, labels = build_coordinator(cfg)
        sink.export = lambda folder: export_model(coord.fm, coord.state, folder, model_path,
                                                  coord.task.peft_task_type, labels, coord.task.name)
        # the SuperLink's limit on client pushes (ingress.py)
        write_limit(out_dir, request_limit(coord.fm, cfg, coord.plan, coord.strategy.init_releases > 0))
        ckpt = find_checkpoint(out_dir)  # checkpoint.safetensors, else an older fedlora's checkpoint.pt
        if bool(run_config.get("resume", False)) and ckpt is not None:
            coord.restore(ckpt)
            sink.resume(coord.rows)
            log.info("resuming after round %d", coord.round)
        else:
            sink.begin(cfg)  # the job is set up: only now is an earlier run's output replaced
            restart_log(logged, start)  # ... its log too
        status["begun"] = True  # fedlora-server reads metrics.jsonl from here
        sink.status("running", **status)
        sink.tracking = Tracking.open(cfg, out_dir, fresh=coord.round == 0)  # --track: rows go there too
        settings = RoundSettings.from_run_config(run_config)
        log.info("fedlora %s: %d rounds, rank %d, %d clients (%d per round; min %d replies, timeout %.0fs)",
                 cfg.strategy, cfg.rounds, cfg.rank, cfg.num_clients, cfg.per_round(),
                 settings.min_replies, settings.round_timeout)
        loop.run(coord, FlowerTransport(grid, coord, settings, labels), sink)
        sink.export(out_dir / "adapter")  # the final adapter, as every --save-every one
        if sink.tracking is not None:
            sink.tracking.finish({"adapter": [out_dir / "adapter"]})
    except BaseException as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sink.status("failed", error=reason, refused=isinstance(exc, UserError), **status)
        if sink.tracking is not None:
            sink.tracking.close(failed=True)
        raise
    finally:
        logging.getLogger("fedlora").removeHandler(logged)
        logged.close()
    sink.status("finished", rounds=coord.round, **status)
    lock.close()


def _log_round(row: dict) -> None:
    score = "not scored" if row["accuracy"] is None else f"{row['metric']} {row['accuracy']:.4f}"
    log.info("round %d done: %s, %d clients", row["round"], score, row["clients"])


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # fedlora's notes (test prompts cut to --max-length, clients out of privacy budget) reach
    # OUT/server.log, which fedlora-server prints: this process's stderr reaches no terminal
    with listening(log.warning):
        die_with_parent()  # no orphan ServerApp writing into --out after its SuperLink is gone
        fast_object_pulls(RoundSettings.from_run_config(dict(context.run_config)).round_timeout)
        run_server(grid, dict(context.run_config), context.run_id)
