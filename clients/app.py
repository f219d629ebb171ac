"""The Flower ``ClientApp``: trains this node's adapter on its data.

Replies carry the upload (``upload`` arrays, or ``grads`` for Fed-SB's round 0; with
``--secagg`` SecAgg+'s masked update, see ``clients/secagg.py``) and ``metrics``
(``num-examples``, ``train-loss``, ``train-seconds``, ``rank``, ``client-id``; ``data-digest`` for
a node's own ``--data``, which the server holds it to for the run). The node's
:class:`fedlora.training.client.LocalClient` (model, data, folds)
is cached per (run, node): under ``fedlora-client`` the ClientApp runs inside one
long-lived process, so the base model is loaded once per run, not per message. What must
outlive a rebuilt client (its DP ledger, the personal factors its strategy keeps, ``--compress``'s
error-feedback residual) is kept in the node's ``context.state`` and in a file beside the ledger.
With ``--compress`` the upload travels coded (``fedlora.rounds.compress``), and with
``--compress-down`` so does what the server sends.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from torch import Tensor

from fedlora.clients.secagg import is_secure, secagg_bridge, secure_reply
from fedlora.errors import UserError
from fedlora.job.checks import check_job_args
from fedlora.job.flags import flag_name
from fedlora.job.runconfig import from_run_config
from fedlora.job.schema import JobConfig
from fedlora.job.warm import forget
from fedlora.models.state import probes_from_tensors
from fedlora.rounds.checkpoint import load_tensors, save_tensors
from fedlora.rounds.compress import unpack
from fedlora.rounds.wire import from_record, to_record
from fedlora.training.client import ClientData, LocalClient

app = ClientApp(mods=[secagg_bridge])
KEPT = "fedlora-kept"  # context.state record: the client's personal factors (plan's keep)
RESIDUAL = "fedlora-residual"  # context.state record: --compress's error-feedback residual
_CACHE: dict[tuple[int, int], LocalClient] = {}
_RUN: dict[str, int] = {}  # the run the caches hold
CACHED_CLIENTS = 1
"""Clients this process keeps warm: a SuperNode serves one node; a Ray actor of Flower's simulation
serves many virtual nodes and keeps one model at a time (the others are rebuilt from their
``context.state``, with the job's data and their encoded examples as the process keeps them:
``fedlora.job.warm``); an in-process test grid may keep one per node."""


def local_client(msg: Message, context: Context) -> LocalClient:
    """This node's warm client for the message's run (built on first use)."""
    key = (context.run_id, context.node_id)
    client = _CACHE.get(key)
    if client is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if _RUN.get("id") != context.run_id:  # one run at a time: release the previous run's models,
            _CACHE.clear()  # and its data (the model's folder may have changed since: its tokenizer)
            forget()
            _RUN["id"] = context.run_id
        while _CACHE and len(_CACHE) >= CACHED_CLIENTS:
            del _CACHE[next(iter(_CACHE))]  # the oldest
        cfg = from_run_config(dict(context.run_config))
        # the run config's job, checked once as the server checked it; the flags it does not read are
        # the server's to say (said on every client, they named flags the client was never given)
        check_job_args(cfg, unused=False)
        labels = [n for n in msg.content["config"]["label-names"] if n]
        client = LocalClient(cfg, ClientData.from_node_config(dict(context.node_config)), labels)
        _CACHE[key] = client
        client.kept.update(read_kept(client, context))
        client.residuals = read_residuals(client, context)
    if client.budget is not None:
        # the ledger outlives a rebuilt client (Flower's simulation, a restarted ClientApp) in the
        # node's context, and a restarted node or a resumed server in a file
        kept = [client.budget.steps, read_ledger(ledger_path(client, context))]
        if "fedlora-privacy" in context.state.config_records:
            kept.append(int(context.state.config_records["fedlora-privacy"]["steps"]))
        client.budget.steps = max(kept)
    return client


def ledger_path(client: LocalClient, context: Context) -> Path:
    """``$FEDLORA_LEDGER_DIR/<dp run id>-client<id>.json`` (default dir ``~/.cache/fedlora/ledgers``).

    The DP run id comes from ``fedlora-server`` (new per fresh run, kept by ``--resume``), else
    Flower's run id.
    """
    root = Path(os.environ.get("FEDLORA_LEDGER_DIR") or Path.home() / ".cache" / "fedlora" / "ledgers")
    run = client.cfg.dp_run_id or f"flwr-{context.run_id}"
    return root / f"{run}-client{client.where.client_id}.json"


def read_ledger(path: Path) -> int:
    """Steps recorded in a ledger file (0 when there is none)."""
    try:
        return int(json.loads(path.read_text())["steps"])
    except (OSError, ValueError, KeyError):
        return 0


def kept_path(client: LocalClient, context: Context) -> Path:
    """The file of the client's personal factors, beside its ledger (``.kept.safetensors``)."""
    return ledger_path(client, context).with_suffix(".kept.safetensors")


def read_by_round(context: Context, record: str, path: Path, *older: Path) -> dict[int, dict[str, Tensor]]:
    """Tensors a client keeps by round (``t<round>.<name>``), as :func:`keep_by_round` wrote them:
    from the node's ``context.state`` (Flower's simulation rebuilds clients), else from ``path`` or
    an ``older`` file (a restarted node, or a resumed server, which starts a new Flower run)."""
    flat: dict[str, Tensor] = {}
    found = next((f for f in (path, *older) if f.is_file()), None)
    if record in context.state.array_records:
        flat = from_record(context.state[record])
    elif found is not None:
        flat = load_tensors(found)
    out: dict[int, dict[str, Tensor]] = {}
    for key, t in flat.items():
        rnd, _, name = key.partition(".")
        out.setdefault(int(rnd[1:]), {})[name] = t
    return out


def keep_by_round(context: Context, record: str, path: Path, by_round: dict[int, dict[str, Tensor]]) -> None:
    """Keep ``by_round`` in the node's ``context.state`` and in ``path`` (atomically); nothing if empty."""
    flat = {f"t{rnd}.{name}": t for rnd, held in by_round.items() for name, t in held.items()}
    if not flat:
        return
    context.state[record] = to_record(flat)
    save_tensors(path, flat)  # atomic


def read_kept(client: LocalClient, context: Context) -> dict[int, dict[str, Tensor]]:
    """A rebuilt client's personal factors by round (the plan's keep)."""
    path = kept_path(client, context)
    # an older fedlora's torch.save file is read too, without unpickling code
    return read_by_round(context, KEPT, path, path.with_suffix(".pt"))


def residual_path(client: LocalClient, context: Context) -> Path:
    """The file of the client's ``--compress`` residual, beside its ledger (``.residual.safetensors``)."""
    return ledger_path(client, context).with_suffix(".residual.safetensors")


def read_residuals(client: LocalClient, context: Context) -> dict[int, dict[str, Tensor]]:
    """A rebuilt client's error-feedback residuals by round."""
    return read_by_round(context, RESIDUAL, residual_path(client, context))


def _keep_residual(client: LocalClient, context: Context) -> None:
    keep_by_round(context, RESIDUAL, residual_path(client, context), client.residuals)


def _keep_factors(client: LocalClient, context: Context) -> None:
    keep_by_round(context, KEPT, kept_path(client, context), client.kept)


def _keep_ledger(client: LocalClient, context: Context) -> None:
    if client.budget is None:
        return
    context.state["fedlora-privacy"] = ConfigRecord({"steps": client.budget.steps})
    path = ledger_path(client, context)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"steps": client.budget.steps, "epsilon": client.budget.spent,
                               "budget": client.budget.epsilon, "delta": client.budget.delta}))
    os.replace(tmp, path)


def _metrics(client: LocalClient, seconds: float, loss: float = 0.0) -> MetricRecord:
    own = {} if client.data_digest is None else {"data-digest": client.data_digest}
    return MetricRecord({"num-examples": len(client), "train-loss": float(loss),
                         "train-seconds": float(seconds), "rank": client.rank,
                         "client-id": client.where.client_id, "epsilon": float(client.epsilon),
                         "noise-multiplier": 0.0 if client.budget is None else float(client.budget.sigma),
                         **own})


def _load_global(client: LocalClient, msg: Message) -> None:
    """Apply the message's global state (``global`` arrays, missing folds in ``catchup``, the
    fresh-adapter seed, the global adapter's scale and the measured clip in ``config``) for its round."""
    conf = msg.content["config"]
    catch = from_record(msg.content["catchup"]) if "catchup" in msg.content.array_records else {}
    seed = int(conf["fresh-seed"])
    down = unpack(client.down, from_record(msg.content["global"])  # --compress-down: as coded
                  if "global" in msg.content.array_records else {})
    client.load(int(conf["round"]), down, unpack(client.down, catch), None if seed < 0 else seed,
                float(conf.get("scale", 0.0)) or None)
    client.clip = float(conf.get("clip", 0.0)) or None  # --dp sample: measured on the server's --init-data


log = logging.getLogger("fedlora.client")
JOB_FLAGS = {flag_name(f.name) for f in fields(JobConfig)}


def refusing(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """``handler``, replying to a job this client refuses (its data has another label or column, ...)
    with an error whose reason is the refusal's one line, which the server's output shows; the
    client's own output gets the same line instead of a traceback."""
    @functools.wraps(handler)
    def replied(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except UserError as exc:
            text = f"{exc}{server_flags(str(exc))}"
            log.error("fedlora-client: error: %s", text)
            return Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"refused: {text}"),
                           reply_to=msg)
    return replied


def server_flags(text: str) -> str:
    """Where a refusal's advice names job flags (``--text-column``): a note that those are set on
    ``fedlora-server`` (a client has only its own: ``--data``, ``--client-id``, ...); else ''. A
    client was told to pass a flag ``fedlora-client`` does not have."""
    named = dict.fromkeys(re.findall(r"--[a-z][a-z0-9-]*", text))
    job = [f for f in named if f in JOB_FLAGS and f != "--data"]
    return f" ({', '.join(job)}: set on fedlora-server)" if job else ""


@app.train()
@refusing
def train(msg: Message, context: Context) -> Message:
    """Round t: load the global state (and missing folds), train, reply with the adapter."""
    client = local_client(msg, context)
    conf = msg.content["config"]
    rnd = int(conf["round"])
    _load_global(client, msg)
    upload, loss, seconds = client.fit(rnd)
    _keep_ledger(client, context)
    _keep_factors(client, context)
    if is_secure(msg):  # --secagg: SecAgg+ masks the update before it leaves this node
        return secure_reply(client, upload, _metrics(client, seconds, loss), msg)
    message, (err, norm) = client.coded(upload, rnd)  # --compress (none: the upload as it is)
    _keep_residual(client, context)
    metrics = _metrics(client, seconds, loss)
    if client.codec.on:
        metrics["compress-err2"], metrics["compress-norm2"] = float(err), float(norm)
    return Message(RecordDict({"upload": to_record(message), "metrics": metrics}), reply_to=msg)


@app.evaluate()
@refusing
def evaluate(msg: Message, context: Context) -> Message:
    """After round t: load the new global state (with what this client keeps) and measure it
    on this client's held-out examples (``--personal-test-fraction``)."""
    client = local_client(msg, context)
    _load_global(client, msg)
    got = client.evaluate()
    metrics = MetricRecord({"accuracy": float(got["accuracy"]), "eval-examples": int(got["eval_examples"]),
                            "client-id": client.where.client_id})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
@refusing
def gradient(msg: Message, context: Context) -> Message:
    """An initialisation phase (Fed-SB): this client's ``Lᵀ G R`` for the message's probes; or,
    for an ``identify`` query, which client this node is (from its node config, before any model
    is loaded): the server samples rounds by client id; or the server's note that this node is left
    out (its client id is another live node's), refused so that this client's output says why."""
    if msg.content["config"].get("left-out"):  # another live node is this client: say why nothing comes
        raise UserError(str(msg.content["config"]["left-out"]))
    if msg.content["config"].get("identify"):
        where = ClientData.from_node_config(dict(context.node_config))
        return Message(RecordDict({"metrics": MetricRecord({"client-id": where.client_id})}), reply_to=msg)
    client = local_client(msg, context)
    tensors = from_record(msg.content["probes"]) if "probes" in msg.content.array_records else {}
    probes = probes_from_tensors(tensors, list(client.fm.adapters))
    grads, seconds = client.gradient(probes, int(msg.content["config"].get("phase", 0)))
    _keep_ledger(client, context)
    message = client.codec.encode_once(grads)  # --compress (none: as they are)
    return Message(RecordDict({"grads": to_record(message), "metrics": _metrics(client, seconds)}),
                   reply_to=msg)
